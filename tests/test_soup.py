"""Model soups (drtune.soup): the average is the mean, greedy keeps what does not lower the score, a soup loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drtune.backbones import create_backbone
from drtune.inference import load_predictor
from drtune.model_file import model_bytes, read_model
from drtune.soup import SoupError, average, greedy, soup
from drtune.task import Classifier

PARAMS = {"model": {"name": "test_efficientnet", "pretrained": "none"}, "train": {"image_size": 32}}


def _model(shift: float, classes=("a", "b", "c")):
    """The same network with every floating tensor moved by ``shift``."""
    torch.manual_seed(0)
    state = Classifier(create_backbone("test_efficientnet", "none"), len(classes)).state_dict()
    tensors = {k: v + shift if v.is_floating_point() else v for k, v in state.items()}
    return read_model(model_bytes(tensors, PARAMS, list(classes)))


def test_the_average_is_the_mean_of_the_weights_and_counters_come_from_the_first() -> None:
    a, b = _model(0.0), _model(1.0)
    b.tensors["head.bias"] += 2.0  # not a plain shift: the mean is per element
    mean = average([a, b])
    for key, tensor in a.tensors.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(mean[key], (tensor.double() + b.tensors[key].double()).div(2).to(tensor.dtype))
        else:
            assert torch.equal(mean[key], tensor)  # num_batches_tracked: not averaged
    with pytest.raises(SoupError, match="one backbone and one set of classes"):
        average([a, _model(0.0, classes=("a", "b"))])


def test_greedy_keeps_an_ingredient_only_when_the_score_does_not_fall() -> None:
    """Scores reward a mean shift near 1: 0.8 alone scores −0.2; with 1.3 the mean is 1.05 (kept); 5.0 would
    move it to 2.37 (refused); 1.1 would give 1.067, below 1.05's score (refused)."""
    base = _model(0.0)
    models = [_model(s) for s in (0.8, 1.3, 5.0, 1.1)]
    key = next(k for k, v in base.tensors.items() if v.is_floating_point())

    def score(m) -> float:
        shift = (m.tensors[key] - base.tensors[key]).mean().item()
        return -abs(shift - 1.0)

    kept, trace, result = greedy(models, score)
    assert kept == [0, 1]
    assert torch.equal(result.tensors[key], soup(models[:2]).tensors[key])  # the soup it kept, not rebuilt
    assert trace == pytest.approx(
        [-0.2, -0.05, -abs((0.8 + 1.3 + 5.0) / 3 - 1), -abs((0.8 + 1.3 + 1.1) / 3 - 1)], abs=1e-5
    )


def test_a_soup_is_an_ordinary_model_file_and_a_soup_of_one_model_predicts_as_it_does() -> None:
    a = _model(0.0)
    same = soup([a, a])
    assert same.params == a.params and same.classes == a.classes
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        load_predictor(same).predict_proba(images), load_predictor(a).predict_proba(images), atol=1e-6
    )
