"""From a model file to predictions: the inference model alone, and batches of raw images.

The inference model is the downstream encoder + head only, read from a model file
(:mod:`drtune.model_file`); a training checkpoint's frozen copy and banks are training state and
are dropped. Inputs are the images a user has, not tensors prepared for
the network: uint8 H × W × C arrays (C = 1 or 3, any size; a batch N × H × W × C or a list of
differently sized images) or float N × C × H × W in [0, 1]. Each is resized and centre-cropped
to the trained image size and normalised with the backbone's mean and std, exactly as the
validation images were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drtune.backbones import create_backbone, data_config
from drtune.data import ArraySplit, build_loader, build_transform, check_image_size
from drtune.evaluation import evaluate
from drtune.model_file import ModelFile, ModelFileError, read_model, save_model
from drtune.task import Classifier
from drtune.train import load_checkpoint_state


@dataclass
class Predictor:
    """An inference model with what it needs to read raw images."""

    model: Classifier
    classes: list[str]
    image_size: int
    data_cfg: dict
    temperature: float = 1.0  # probabilities are softmax(logits / temperature) (drtune.temperature)

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray | list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Class probabilities, N × classes, for a batch of images (see the module docstring), calibrated by
        the model's temperature."""
        transform = build_transform(self.data_cfg, self.image_size, train=False)
        tensors = [transform(t) for t in to_chw(images)]
        self.model.eval()
        out = [
            torch.softmax(self.model(torch.stack(tensors[i : i + batch_size])).float() / self.temperature, dim=1)
            for i in range(0, len(tensors), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def score(self, split: ArraySplit, batch_size: int = 256) -> dict:
        """:func:`drtune.evaluation.evaluate` on ``split`` with this model's evaluation transform, on the CPU:
        top-1, top-5, loss, ``n``, the predicted classes, the confusion matrix and the logits (before any
        temperature)."""
        loader = build_loader(split, self.data_cfg, self.image_size, batch_size, train=False)
        return evaluate(self.model, loader, torch.device("cpu"), predictions=True)


def to_chw(images: np.ndarray | list[np.ndarray]) -> list[torch.Tensor]:
    """uint8/integer HWC (0–255) or float NCHW ([0, 1]) → a list of uint8 3 × H × W tensors."""
    if isinstance(images, np.ndarray) and images.dtype != object and np.issubdtype(images.dtype, np.floating):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"float input must be N × C × H × W in [0, 1] with C = 1 or 3, got shape {images.shape}")
        if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1 or np.isnan(images).any()):
            raise ValueError(
                f"float input must hold values in [0, 1], got {np.nanmin(images):.3g} … "
                f"{np.nanmax(images):.3g}; send 0–255 images as integers (uint8 H × W × C)"
            )
        batch = torch.from_numpy(images * 255).round().to(torch.uint8)
        return [b.expand(3, -1, -1) for b in batch]
    items = (
        list(images) if not isinstance(images, np.ndarray) or images.dtype == object or images.ndim == 4 else [images]
    )
    out = []
    for i, img in enumerate(items):
        a = np.asarray(img)
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ValueError(f"image {i}: expected H × W × C (C = 1, 3 or 4) integers 0–255, got shape {a.shape}")
        try:
            check_image_size(a.shape[1], a.shape[0])
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from None
        t = torch.from_numpy(np.ascontiguousarray(np.clip(a[..., :3], 0, 255).astype(np.uint8))).permute(2, 0, 1)
        out.append(t.expand(3, -1, -1) if t.shape[0] == 1 else t)
    return out


def load_predictor(source: str | Path | bytes | ModelFile) -> Predictor:
    """A :class:`Predictor` from a model file (:mod:`drtune.model_file`): its path, bytes, or contents.

    A model file holds raw tensors and JSON, so loading one runs no code: a file from a registry or
    a shared bucket is safe to open. A training ``last.pt`` is turned into one with
    :func:`save_inference_checkpoint` first.
    """
    model_file = source if isinstance(source, ModelFile) else read_model(source)
    model = Classifier(create_backbone(model_file.model_name, "none"), len(model_file.classes))
    try:
        model.load_state_dict(model_file.tensors)
    except RuntimeError as err:
        raise ModelFileError(
            f"the model file's tensors do not fit {model_file.model_name}: {str(err).splitlines()[0]}"
        ) from None
    return Predictor(
        model.eval(),
        model_file.classes,
        model_file.params["train"]["image_size"],
        data_config(model.encoder),
        model_file.temperature,
    )


def save_inference_checkpoint(checkpoint: str | Path, target: str | Path) -> Path:
    """Strip a training checkpoint (``last.pt``) to a model file: encoder + head weights, params, classes, history."""
    state = load_checkpoint_state(Path(checkpoint))
    tensors = {k.removeprefix("model."): v for k, v in state["task"].items() if k.startswith("model.")}
    return save_model(target, tensors, state["params"], state["classes"], state.get("history", []))
