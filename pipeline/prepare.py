"""The ``prepare`` stage: ``params.yaml: data.*`` → ``data/prepared/``.

    python -m pipeline.prepare --params params.yaml

Writes ``train.npz``, ``val.npz``, ``test.npz`` (uint8 images N × H × W × C and int64 labels),
``classes.json`` and ``stats.json`` (images per class per split, image shape, bad files skipped,
SHA-256 of each split and of the source arrays). Everything is built in a sibling temporary
folder and swapped in only when complete, so a failed run leaves the previous output intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from drtune.config import ConfigError, DataConfig, load_params
from drtune.data import ArraySplit
from drtune.sources import load_splits


def _sha256(split: ArraySplit) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.images).tobytes())
    h.update(np.ascontiguousarray(split.labels).tobytes())
    return h.hexdigest()


def prepare(cfg: DataConfig) -> dict:
    """Load, split and write the prepared dataset; returns the stats written to ``stats.json``."""
    raw, parts = load_splits(cfg)
    splits = dict(zip(("train", "val", "test"), parts, strict=True))
    stats = {
        "dataset": cfg.dataset, "classes": raw.classes, "image_shape": list(raw.train.images.shape[1:]),
        "skipped_bad_files": raw.skipped_bad,
        "counts": {name: np.bincount(s.labels, minlength=len(raw.classes)).tolist() for name, s in splits.items()},
        "sha256": {name: _sha256(s) for name, s in splits.items()},
        "source_sha256": {"train": _sha256(raw.train), "test": _sha256(raw.test)},
    }
    target = Path(cfg.prepared_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, split in splits.items():
            np.savez(staging / f"{name}.npz", images=split.images, labels=split.labels)
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


def load_prepared(folder: str | Path) -> tuple[ArraySplit, ArraySplit, ArraySplit, list[str], dict]:
    """(train, val, test, classes, stats) as written by :func:`prepare`."""
    folder = Path(folder)
    if not (folder / "stats.json").is_file():
        raise FileNotFoundError(f"{folder} holds no prepared dataset: run `python -m pipeline.prepare` first")
    splits = []
    for name in ("train", "val", "test"):
        with np.load(folder / f"{name}.npz") as z:
            splits.append(ArraySplit(z["images"], z["labels"]))
    return (*splits, json.loads((folder / "classes.json").read_text()), json.loads((folder / "stats.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        stats = prepare(load_params(args.params, args.set).data)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: stats["counts"][k] for k in ("train", "val", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
