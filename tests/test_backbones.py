"""Backbones: the bundled weights are real ImageNet weights; third-party layouts remap; misfits fail loudly."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from drtune.backbones import (
    CheckpointMismatchError,
    create_backbone,
    data_config,
    load_checkpoint,
)


def test_bundled_lite0_weights_are_real_imagenet_weights() -> None:
    """The 1000-class head recognises two CC0 photos shipped with scikit-image."""
    data = pytest.importorskip("skimage.data")
    model = create_backbone("tf_efficientnet_lite0", "bundled", num_classes=1000).eval()
    cfg = data_config(model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"  # from the model, not ImageNet stats
    transform = timm.data.create_transform(**cfg)
    batch = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        probs = model(batch).softmax(dim=1)
    cat_classes = list(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probs[0].argmax().item() in cat_classes and probs[0, cat_classes].sum() > 0.8
    assert probs[1].argmax().item() == 967  # espresso


def test_bundled_feature_extractor_drops_classifier() -> None:
    model = create_backbone("tf_efficientnet_lite0", "bundled")
    assert model.num_features == 1280
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)
    random = create_backbone("tf_efficientnet_lite0", "none")
    assert not torch.equal(model.conv_stem.weight, random.conv_stem.weight)


def test_bundled_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite0 only"):
        create_backbone("test_resnet", "bundled")


def test_moco_checkpoint_loads_through_the_remap(tmp_path) -> None:
    """A MoCo v2 file: state_dict with module.encoder_q.* (and a projector fc.0/fc.2), module.encoder_k.*, queue."""
    source = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in source.state_dict().items()})
    state["module.encoder_q.fc.0.weight"] = torch.zeros(8, source.num_features)
    state["module.encoder_q.fc.2.weight"] = torch.zeros(4, 8)
    state["module.queue"] = torch.zeros(4, 16)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet", "state_dict": state}, path)
    model = create_backbone("test_resnet", str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_mae_and_safetensors_checkpoints_load(tmp_path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model("test_vit", num_classes=0)
    mae = {
        "model": {**source.state_dict(), "decoder_embed.weight": torch.zeros(2, 2), "mask_token": torch.zeros(1, 1, 2)}
    }
    torch.save(mae, tmp_path / "mae.pth")
    model = create_backbone("test_vit", str(tmp_path / "mae.pth"))
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = create_backbone("test_vit", str(tmp_path / "w.safetensors"))
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path) -> None:
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "resnet.pth")
    model = timm.create_model("test_efficientnet", num_classes=0)
    with pytest.raises(
        CheckpointMismatchError, match=r"missing keys: blocks\.0\.0\.bn1\.bias.*unexpected keys: conv1\.0\.weight"
    ):
        load_checkpoint(model, tmp_path / "resnet.pth")
    state = model.state_dict()
    state["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes: conv_stem\.weight"):
        load_checkpoint(timm.create_model("test_efficientnet", num_classes=0), tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone("test_resnet", str(tmp_path / "nope.pth"))
