"""The pretrain stage's output as the later stages read it: the backbone every training run starts from.

``models/pretrained/pretrain.json`` records what the stage did (``method: none``: nothing, and
``model.pretrained`` stays as configured); with a method, ``backbone.safetensors`` beside it is the
start of every later run. :func:`start_weights` checks that the record matches the current settings
and the file its SHA-256, and hands over the file's bytes, which travel to Ray workers through the
object store (a worker on another node does not have the driver's disk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from drtune.config import ConfigError
from drtune.prepared import prepared_stats
from pipeline.config import PRETRAINED_WEIGHTS, WEIGHT_SOURCES, PipelineConfig

WEIGHTS = Path(PRETRAINED_WEIGHTS)
OUTPUT = WEIGHTS.parent
RECORD = OUTPUT / "pretrain.json"


@dataclass(frozen=True)
class StartWeights:
    """The backbone every training run starts from: None (``model.pretrained`` as configured) or the stage's file."""

    content: bytes | None
    sha256: str

    def files(self) -> dict[str, bytes]:
        """The weight files the workers need, by the ``model.pretrained`` that names them (none, or the stage's)."""
        return {PRETRAINED_WEIGHTS: self.content} if self.content is not None else {}


def start_weights(p: PipelineConfig, root: Path = Path(".")) -> StartWeights:
    """Read the pretrain stage's output for the later stages, checking it was made with these settings."""
    if p.pretrain.method == "none":
        return StartWeights(None, "")
    record_path = root / RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"pretrain.method = {p.pretrain.method}: {RECORD} is missing; run the pretrain stage")
    record = json.loads(record_path.read_text())
    ignored = {"knn_k", "checkpoint_every"}  # they do not change the weights
    settings = p.pretrain.model_dump(mode="json", exclude=ignored)
    made_with = {k: v for k, v in record.get("settings", {}).items() if k not in ignored}
    start = p.model.pretrained if p.pretrain.init == "weights" else "random"
    if made_with != settings or record.get("model") != p.model.name or record.get("start") != start:
        raise ConfigError(f"{RECORD} was made with other pretrain.* or model.* settings; run the pretrain stage again")
    unlabelled = (prepared_stats(root / p.data.prepared_dir).get("unlabelled") or {}).get("sha256")
    if record.get("unlabelled_sha256") != unlabelled:
        raise ConfigError(f"{RECORD} was made from another unlabelled split; run the pretrain stage again")
    content = (root / WEIGHTS).read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    if sha != record["sha256"]:
        raise ConfigError(f"{WEIGHTS} does not match {RECORD}'s SHA-256; run the pretrain stage again")
    return StartWeights(content, sha)


def pretrain_record(p: PipelineConfig, root: Path = Path(".")) -> dict | None:
    """The pretrain stage's record (method, epochs, images, kNN top-1, …), or None with ``pretrain.method: none``."""
    if p.pretrain.method == "none":
        return None
    return json.loads((root / RECORD).read_text())


def backbone_files(p: PipelineConfig, start: StartWeights, root: Path = Path(".")) -> tuple[dict[str, bytes], str]:
    """(every weight file the search's trials start from, by the ``model.pretrained`` that names it; a digest of
    them all): the pretrain stage's output and each local checkpoint ``tune.models`` lists. They travel to the
    workers through Ray's object store, so a worker on a node without the driver's disk trains from the same
    bytes; the digest names the search, so a changed file starts a new one."""
    files = start.files()
    for c in p.tune.models or []:
        weights = p.backbone_weights(c)
        if weights not in WEIGHT_SOURCES and weights not in files:
            files[weights] = (root / weights).read_bytes()  # an absolute path stays itself under root
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return files, digest.hexdigest() if files else ""
