"""Temperature scaling (drtune.temperature), and the temperature carried by the model file, the predictor and ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drtune.temperature import expected_calibration_error, fit_temperature, probabilities, reliability


def _calibrated(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: each label is drawn from the softmax itself."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = probabilities(logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


def test_a_planted_over_confidence_is_recovered() -> None:
    """Calibrated logits multiplied by 3 are over-confident: the fitted temperature is ~3, and it brings the
    expected calibration error back down; the predictions themselves do not change."""
    logits, labels = _calibrated()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)
    sharp = 3.0 * logits
    t = fit_temperature(sharp, labels)
    assert t == pytest.approx(3.0, rel=0.08)
    before, after = (expected_calibration_error(probabilities(sharp, x), labels) for x in (1.0, t))
    assert before > 0.1 and after < 0.03
    assert (probabilities(sharp, t).argmax(1) == sharp.argmax(1)).all()


def test_a_split_with_no_mistake_gives_no_temperature_and_the_fit_stays_bounded() -> None:
    """Every validation image right: the loss falls as T → 0 and says nothing about over-confidence, so T stays 1.
    One mistake among confident answers: T is fitted, finite and within its bounds."""
    logits = np.array([[9.0, 0.0], [0.0, 9.0], [7.0, 1.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0
    t = fit_temperature(logits, np.array([0, 1, 1]))
    assert 1.0 < t <= 20.0 and np.isfinite(t)


def test_ece_and_reliability_bins_by_hand() -> None:
    """Four images: two at confidence 0.95 (one right), two at 0.65 (both right); no value on a bin edge."""
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    labels = np.array([0, 1, 0, 1])
    bins = {
        (round(b["low"], 2), b["n"]): (b["confidence"], b["accuracy"]) for b in reliability(proba, labels, 10) if b["n"]
    }
    assert bins == {(0.9, 2): (pytest.approx(0.95), 0.5), (0.6, 2): (pytest.approx(0.65), 1.0)}
    assert expected_calibration_error(proba, labels, 10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.35)


def test_the_temperature_travels_in_the_model_file_to_the_predictor_and_the_onnx_twin(tmp_path, tiny_encoder) -> None:
    """A calibrated model file keeps its tensors and gains the temperature: the predictor's probabilities are
    softmax(logits / T), and the ONNX export's `probabilities` output matches them."""
    pytest.importorskip("onnxruntime")
    from drtune.backbones import create_backbone
    from drtune.config import Config
    from drtune.export import export_onnx
    from drtune.inference import load_predictor
    from drtune.model_file import read_model, save_model, with_temperature
    from drtune.task import Classifier

    torch.manual_seed(0)
    params = Config().model_dump(mode="json")
    params["model"]["name"], params["train"]["image_size"] = "test_efficientnet", 16
    model = Classifier(create_backbone("test_efficientnet", "none"), 3)
    path = save_model(tmp_path / "m.safetensors", model.state_dict(), params, ["a", "b", "c"])
    plain = read_model(path)
    calibrated = read_model(with_temperature(plain, 2.5).data)
    assert calibrated.temperature == 2.5 and plain.temperature == 1.0 and calibrated.sha256 != plain.sha256
    assert all(torch.equal(calibrated.tensors[k], plain.tensors[k]) for k in plain.tensors)
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    p1, p25 = (load_predictor(m).predict_proba(images) for m in (plain, calibrated))
    logits = np.log(p1)  # softmax is shift-invariant: log-probabilities are logits
    assert np.allclose(p25, probabilities(logits, 2.5), atol=1e-5) and (p25.argmax(1) == p1.argmax(1)).all()
    check = export_onnx(load_predictor(calibrated), tmp_path / "m.onnx", images)
    assert check["temperature"] == 2.5 and check["max_abs_probability_diff"] < 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "probabilities"]
    assert [float(onnx.numpy_helper.to_array(i)) for i in graph.initializer if i.name == "temperature"] == [2.5]
