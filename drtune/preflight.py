"""Checks of what a training run would otherwise reject minutes later, inside a worker, run before any compute.

A bad ``model.name``, ``bundled`` weights on another architecture, a checkpoint file that is
missing, unreadable with ``weights_only=True`` or shaped for another backbone, an output folder
that cannot be written and a disk too small for the checkpoints each fail here, in one line that
names the field (a :class:`~drtune.config.ConfigError`), rather than as a traceback from a Ray
worker after the cluster has started. ``drtune fit`` and the pipeline's stages call :func:`preflight`.
"""

from __future__ import annotations

import difflib
import pickle
import shutil
import uuid
from pathlib import Path

import timm
import torch

from drtune import methods
from drtune.backbones import CheckpointMismatchError, create_backbone
from drtune.config import Config, ConfigError, ModelConfig


def check_model(model: ModelConfig, field: str = "model") -> torch.nn.Module:
    """Build the backbone exactly as a worker will (weights loaded, without downloading hub weights);
    returns it. Raises :class:`ConfigError` naming ``<field>.name`` or ``<field>.pretrained`` (``field``:
    where the setting came from, ``model`` or one of the search's ``tune.models[i]``)."""
    if not timm.is_model(model.name):
        close = difflib.get_close_matches(model.name, timm.list_models(), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ConfigError(f"{field}.name = {model.name!r}: timm has no such model{hint}")
    pretrained, named = model.pretrained, f"{field}.pretrained = {model.pretrained!r}"
    if pretrained == "hub":
        cfg = timm.models.get_pretrained_cfg(model.name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ConfigError(f"{named}: timm lists no pretrained weights for {model.name!r}")
        pretrained = "none"  # the download itself happens in the worker
    try:
        return create_backbone(model.name, pretrained)
    except FileNotFoundError as err:
        raise ConfigError(f"{named}: {err}") from None
    except CheckpointMismatchError as err:
        raise ConfigError(f"{named}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ConfigError(
            f"{named}: not a checkpoint torch can load with "
            f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    except ValueError as err:  # bundled weights on another architecture
        raise ConfigError(f"{named}: {err}") from None


def checkpoint_bytes(config: Config, backbone: torch.nn.Module, num_classes: int = 1000) -> int:
    """Size of one ``last.pt``: the trained weights, the frozen copy (DR-Tune, L2-SP), the optimiser's
    momentum, the banks and the reused rotation, in float32."""
    weights = sum(p.numel() for p in backbone.parameters()) + (backbone.num_features + 1) * num_classes
    spec = methods.get(config.train.method)
    copies = 2 + spec.frozen_copy  # weights, momentum, frozen copy
    floats = copies * weights
    if spec.feature_bank:
        floats += 2 * config.drtune.queue_size * backbone.num_features
        if config.drtune.rotation_between == "reuse":
            floats += backbone.num_features**2
    return 4 * floats


def check_writable(folder: str | Path, field: str) -> Path:
    """Create ``folder`` if needed and write a probe file in it; :class:`ConfigError` naming ``field`` if that fails."""
    folder = Path(folder)
    probe = folder / f".drtune-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field} = {str(folder)!r} is not writable: {err.strerror or err}") from None
    return folder


def check_disk(folder: str | Path, need: int, field: str) -> None:
    """:class:`ConfigError` naming ``field`` when ``folder``'s disk has less than ``need`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConfigError(
            f"{field} = {str(folder)!r}: {free / 2**20:.0f} MiB free, but the checkpoints need about "
            f"{need / 2**20:.0f} MiB"
        )


def preflight(
    config: Config,
    output: str | Path | None,
    *,
    field: str = "--output",
    checkpoints: int = 2,
    model_field: str = "model",
) -> None:
    """All of the above for one run (or a search writing ``checkpoints`` checkpoints) into ``output``.

    ``output`` is a local folder, or None when checkpoints go to remote storage (nothing to check here).
    Two checkpoints per run: ``last.pt`` and the temporary file it is atomically replaced from. A bad backbone
    is named as ``model_field`` (``model``, or the search's ``tune.models[i]``).
    """
    backbone = check_model(config.model, model_field)
    if output is not None:
        folder = check_writable(output, field)
        check_disk(folder, checkpoints * checkpoint_bytes(config, backbone), field)
