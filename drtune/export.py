"""ONNX export of the inference network, checked against PyTorch with onnxruntime.

The exported graph is the encoder + head on *prepared* input: float32 N × 3 × S × S, already resized,
centre-cropped and normalised (the preprocessing is data, not code: the registered model's
metadata states it). The batch dimension is dynamic. Two outputs: ``logits`` and ``probabilities``,
``softmax(logits / temperature)`` with the model's calibration temperature (:mod:`drtune.temperature`)
held in the graph as the scalar initializer ``temperature``. :func:`export_onnx` then runs the same
prepared images through PyTorch and onnxruntime and refuses the export unless every image gets the
same label and the logits and probabilities agree within :data:`LOGIT_TOLERANCE`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from drtune.data import build_transform
from drtune.inference import Predictor, to_chw

# Largest allowed |logit difference| between PyTorch and onnxruntime, relative to the largest |logit|:
# both run float32, and reordered sums differ by a few units of the 24-bit mantissa per layer
# (measured on the quick model and Lite0: under 1e-5); 1e-3 leaves room for deeper networks.
LOGIT_TOLERANCE = 1e-3


class ExportMismatchError(ValueError):
    """onnxruntime and PyTorch disagree on the check images."""


class _Calibrated(torch.nn.Module):
    """The network with two outputs: its logits, and ``softmax(logits / temperature)`` with the temperature an
    initializer of the graph (named ``temperature``), so an ONNX user gets the calibrated probabilities."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def prepare(predictor: Predictor, images: np.ndarray) -> torch.Tensor:
    """Raw uint8 images → the network's float input, exactly as :meth:`Predictor.predict_proba` prepares it."""
    transform = build_transform(predictor.data_cfg, predictor.image_size, train=False)
    return torch.stack([transform(t) for t in to_chw(images)])


def export_onnx(predictor: Predictor, path: str | Path, check_images: np.ndarray, opset: int = 18) -> dict:
    """Write ``predictor``'s network to ``path`` as ONNX and check it on ``check_images`` (raw uint8 images).

    Returns the check: ``{"images", "labels_equal", "max_abs_logit_diff", "relative_diff", "tolerance"}``.
    Raises :class:`ExportMismatchError` when a label differs or the logits differ beyond the tolerance.
    """
    import onnxruntime

    model = predictor.model.eval()
    calibrated = _Calibrated(model, predictor.temperature).eval()
    x = prepare(predictor, check_images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # TorchScript-based exporter: no extra dependency beyond onnx, and a dynamic batch axis. Its
    # deprecation notice and the tracer's note on ``return_features`` (a constant here) are not news.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            calibrated,
            (x[:1],),
            str(path),
            input_names=["image"],
            output_names=["logits", "probabilities"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    with torch.no_grad():
        expected, expected_proba = (t.float().numpy() for t in calibrated(x))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, got_proba = session.run(["logits", "probabilities"], {"image": x.numpy()})
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max()) or 1.0
    check = {
        "images": len(x),
        "labels_equal": bool((got.argmax(1) == expected.argmax(1)).all()),
        "max_abs_logit_diff": diff,
        "relative_diff": diff / scale,
        "max_abs_probability_diff": float(np.abs(got_proba - expected_proba).max()),
        "temperature": predictor.temperature,
        "tolerance": LOGIT_TOLERANCE,
    }
    if (
        not check["labels_equal"]
        or check["relative_diff"] > LOGIT_TOLERANCE
        or check["max_abs_probability_diff"] > LOGIT_TOLERANCE
    ):
        raise ExportMismatchError(f"the ONNX export of {path.name} disagrees with PyTorch: {check}")
    return check
