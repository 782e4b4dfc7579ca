"""The model file: one safetensors file with JSON metadata, read without running code."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from drtune.backbones import create_backbone
from drtune.inference import load_predictor
from drtune.model_file import ModelFileError, read_metadata, read_model, save_model
from drtune.task import Classifier

PARAMS = {"model": {"name": "test_efficientnet", "pretrained": "none"}, "train": {"image_size": 16, "method": "ce"}}


def _classifier(classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_backbone("test_efficientnet", "none"), classes).eval()


def test_a_saved_model_loads_to_the_same_predictions(tmp_path) -> None:
    model = _classifier()
    history = [{"epoch": 1, "val_top1": 0.5}]
    path = save_model(tmp_path / "m.safetensors", model.state_dict(), PARAMS, ["a", "b", "c"], history)
    assert read_metadata(path) == {"params": PARAMS, "classes": ["a", "b", "c"], "history": history}
    loaded = read_model(path)
    assert loaded.sha256 == read_model(path.read_bytes()).sha256 and len(loaded.sha256) == 64
    predictor = load_predictor(loaded)
    assert predictor.classes == ["a", "b", "c"] and predictor.image_size == 16
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(predictor.model(x), model(x))


def test_files_that_are_not_drtune_models_are_refused_without_running_code(tmp_path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    pickled = tmp_path / "crafted.safetensors"
    pickled.write_bytes(pickle.dumps({"task": Boom()}))
    with pytest.raises(ModelFileError, match="not a"):
        read_model(pickled)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))  # a safetensors file of someone else's
    with pytest.raises(ModelFileError, match="not a drtune model file"):
        read_model(foreign)


def test_tensors_that_do_not_fit_the_backbone_are_named(tmp_path) -> None:
    state = _classifier().state_dict()
    state["head.weight"] = torch.zeros(3, 7)
    path = save_model(tmp_path / "bad.safetensors", state, PARAMS, ["a", "b", "c"])
    with pytest.raises(ModelFileError, match="do not fit test_efficientnet"):
        load_predictor(path)
