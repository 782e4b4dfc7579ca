"""The inference model file: one ``.safetensors`` file, the network's tensors plus JSON for the rest.

Every trained model this project hands on is this one format: ``drtune fit``'s
``model.safetensors``, the pipeline's ``models/best.safetensors``, ``models/baseline.safetensors``
and ``models/leaderboard/<method>.safetensors``, and the checkpoint inside the registered MLflow
model. The tensors are the encoder + head state dict (no frozen copy, no banks, no optimiser);
the safetensors header's metadata holds, as JSON, the resolved params that trained it, the class
names and the per-epoch history.

Reading it runs no code (safetensors stores raw tensors; the metadata is JSON), so a file from a
registry or a shared bucket is safe to open. :func:`read_model` takes the file's bytes read once,
so a caller that also hashes the file (``register``) reads it once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

FORMAT = "drtune-model/1"


class ModelFileError(ValueError):
    """A file that is not a drtune model file (or one this version cannot read)."""


@dataclass
class ModelFile:
    """A model file's contents: ``tensors`` (encoder + head state dict), its metadata, and the file's
    ``data`` (its bytes, as read) and their ``sha256``."""

    tensors: dict[str, Tensor]
    params: dict
    classes: list[str]
    history: list[dict] = field(default_factory=list)
    data: bytes = b""
    sha256: str = ""
    temperature: float = 1.0  # softmax(logits / temperature): fitted by register (drtune.temperature), else 1

    @property
    def model_name(self) -> str:
        return self.params["model"]["name"]


def model_bytes(
    tensors: dict[str, Tensor], params: dict, classes: list[str], history: list[dict] = (), temperature: float = 1.0
) -> bytes:
    """A model file's bytes: ``tensors`` made contiguous, on the CPU, and the metadata as JSON in the header
    (the temperature only when it is not 1, so an uncalibrated model's file is what it always was)."""
    content = {"params": params, "classes": list(classes), "history": list(history)}
    if temperature != 1.0:
        content["temperature"] = temperature
    meta = {"format": FORMAT, "drtune": json.dumps(content)}
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)


def save_model(
    path: str | Path, tensors: dict[str, Tensor], params: dict, classes: list[str], history: list[dict] = ()
) -> Path:
    """Write a model file (atomically: a reader never sees half a file); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model_bytes(tensors, params, classes, history))
    tmp.replace(path)
    return path


def with_temperature(model: ModelFile, temperature: float) -> ModelFile:
    """``model`` with its probabilities calibrated by ``temperature``: the same tensors, new bytes."""
    data = model_bytes(model.tensors, model.params, model.classes, model.history, temperature)
    return replace(model, data=data, sha256=hashlib.sha256(data).hexdigest(), temperature=temperature)


def _metadata(data: bytes, source: str) -> dict:
    """The header's JSON metadata, checked to be ours (the format: 8-byte length, then the JSON header)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise ModelFileError(f"{source} is not a safetensors file") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(
            f"{source} is not a drtune model file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return json.loads(meta["drtune"])


def read_model(source: str | Path | bytes) -> ModelFile:
    """A model file from its path or its bytes; :class:`ModelFileError` for anything else."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    name = "the given bytes" if isinstance(source, bytes) else str(source)
    meta = _metadata(data, name)
    try:
        tensors = load_tensors(data)
    except SafetensorError as err:
        raise ModelFileError(f"{name}: damaged tensors ({err})") from None
    return ModelFile(
        tensors,
        meta["params"],
        meta["classes"],
        meta["history"],
        data,
        hashlib.sha256(data).hexdigest(),
        float(meta.get("temperature", 1.0)),
    )


def read_metadata(path: str | Path) -> dict:
    """Only the metadata (``params``, ``classes``, ``history``) of a model file: reads the header, not the tensors."""
    with Path(path).open("rb") as f:
        head = f.read(8)
        return _metadata(head + f.read(int.from_bytes(head, "little")), str(path))
