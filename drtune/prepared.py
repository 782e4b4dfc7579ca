"""A prepared dataset on disk: the train / val / test arrays the ``prepare`` stage writes and training reads.

    data/prepared/
      train.npz  val.npz  test.npz   uint8 images N × H × W × C and int64 labels
      unlabelled.npz                 only with data.unlabelled (rest | a folder): uint8 images, no labels
      classes.json                   class names, index order
      stats.json                     images per class per split, image shape, unreadable files
                                     skipped and non-image files ignored (listed), SHA-256 of each
                                     split and of the source arrays; ``unlabelled``: null, or its
                                     source, count, duplicates dropped and SHA-256; ``checks``:
                                     duplicates and leakage between the splits (drtune.data_checks)

:func:`write_prepared` builds everything in a sibling temporary folder and swaps it in only when
complete, so a failed run leaves the previous output intact. :func:`load_prepared` reads the
labelled splits back, :func:`load_unlabelled` the unlabelled one (kept apart: it can be large).
The unlabelled split leaves the labelled splits and their checksum (:func:`data_checksum`) as
they are; :func:`unlabelled_checksum` names it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drtune.config import DataConfig
from drtune.data import ArraySplit
from drtune.data_checks import check_splits
from drtune.sources import load_splits, load_unlabelled_split, unlabelled_folder

SPLITS = ("train", "val", "test")
UNLABELLED_FILE = "unlabelled.npz"


@dataclass
class PreparedData:
    """The three splits, their class names and ``stats.json``."""

    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    classes: list[str]
    stats: dict

    @property
    def checksum(self) -> str:
        """One checksum of the three splits (from ``stats.json``): names a run's data."""
        return data_checksum(self.stats)


def _sha256(split: ArraySplit) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.images).tobytes())
    h.update(np.ascontiguousarray(split.labels).tobytes())
    return h.hexdigest()


def write_prepared(cfg: DataConfig) -> dict:
    """Load, split and write the prepared dataset to ``cfg.prepared_dir``; returns ``stats.json``'s content."""
    unlabelled_folder(cfg)  # a missing folder fails before any image is read
    raw, parts = load_splits(cfg)
    splits = dict(zip(SPLITS, parts, strict=True))
    unlabelled = load_unlabelled_split(cfg, raw, parts)
    stats = {
        "dataset": cfg.dataset,
        "classes": raw.classes,
        "image_shape": list(raw.train.images.shape[1:]),
        "skipped_bad_files": len(raw.skipped),
        "skipped_files": raw.skipped,
        "ignored_files": raw.ignored,
        "counts": {name: np.bincount(s.labels, minlength=len(raw.classes)).tolist() for name, s in splits.items()},
        "sha256": {name: _sha256(s) for name, s in splits.items()},
        "source_sha256": {"train": _sha256(raw.train), "test": _sha256(raw.test)},
        "unlabelled": None,
        "checks": check_splits(splits, raw.classes, cfg.max_leakage, cfg.near_copies_leak),
    }
    if unlabelled is not None:
        stats["unlabelled"] = {
            "source": unlabelled.source,
            "count": len(unlabelled.images),
            "candidates": unlabelled.candidates,
            "max": cfg.unlabelled_max,
            "dropped_duplicates": unlabelled.dropped,
            "skipped_bad_files": len(unlabelled.skipped),
            "skipped_files": unlabelled.skipped,
            "ignored_files": unlabelled.ignored,
            "sha256": hashlib.sha256(np.ascontiguousarray(unlabelled.images).tobytes()).hexdigest(),
        }
    target = Path(cfg.prepared_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, split in splits.items():
            np.savez(staging / f"{name}.npz", images=split.images, labels=split.labels)
        if unlabelled is not None:
            np.savez(staging / UNLABELLED_FILE, images=unlabelled.images)
        (staging / "classes.json").write_text(json.dumps(raw.classes, indent=1))
        (staging / "stats.json").write_text(json.dumps(stats, indent=1))
        old = target.with_name(f".{target.name}-old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def prepared_stats(folder: str | Path) -> dict:
    """``stats.json`` of a prepared dataset (no image is read)."""
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{Path(folder)} holds no prepared dataset: run `python -m pipeline.prepare` first")
    return json.loads(path.read_text())


def data_checksum(stats: dict) -> str:
    """One checksum of the prepared splits (from ``stats.json``)."""
    return "-".join(stats["sha256"][k][:16] for k in SPLITS)


def unlabelled_checksum(stats: dict) -> str | None:
    """The unlabelled split's checksum (from ``stats.json``), None when there is none: names what a
    self-supervised run read."""
    unlabelled = stats.get("unlabelled")
    return None if unlabelled is None else unlabelled["sha256"][:16]


def load_prepared(folder: str | Path) -> PreparedData:
    """The splits, classes and stats as written by :func:`write_prepared`."""
    folder = Path(folder)
    stats = prepared_stats(folder)
    splits = []
    for name in SPLITS:
        with np.load(folder / f"{name}.npz") as z:
            splits.append(ArraySplit(z["images"], z["labels"]))
    return PreparedData(*splits, json.loads((folder / "classes.json").read_text()), stats)


def load_unlabelled(folder: str | Path) -> np.ndarray:
    """The unlabelled images (uint8 N × H × W × C) written by :func:`write_prepared` with ``data.unlabelled``."""
    folder = Path(folder)
    stats = prepared_stats(folder)
    if stats.get("unlabelled") is None or not (folder / UNLABELLED_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no unlabelled split: set data.unlabelled (rest or a folder of images) and rerun "
            "`python -m pipeline.prepare`"
        )
    with np.load(folder / UNLABELLED_FILE) as z:
        return z["images"]
