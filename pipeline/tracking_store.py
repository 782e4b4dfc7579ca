"""Which MLflow tracking store the runs go to, as a file DVC can see: ``models/tracking.json``.

DVC watches files and ``params.yaml`` values, not the environment, and ``MLFLOW_TRACKING_URI`` overrides
``mlflow.tracking_uri``. Pointing the pipeline at a new server would otherwise change nothing DVC sees:
``dvc repro`` would skip every stage, register nothing on the new server, and ``models/best.json`` would
go on naming runs that live in the old store.

The ``tracking`` stage runs on every ``dvc repro`` (``always_changed``) and writes the store's URI, redacted,
to ``models/tracking.json``. DVC compares that file's content: the stages whose MLflow runs later stages
refer to (``baseline``, ``tune``, ``register``) depend on it, so they run again exactly when the store
changes. New credentials for the same store are not a new store (they are redacted away).

    python -m pipeline.tracking_store --params params.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import PipelineConfig, redact
from pipeline.stage import stage_main

RECORD = Path("models/tracking.json")


def write_record(p: PipelineConfig, root: Path = Path(".")) -> dict:
    """Write ``models/tracking.json`` (only when its content changes, so its time stamp means something)."""
    record = {"tracking_uri": redact(p.tracking_uri())}
    path = root / RECORD
    text = json.dumps(record, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return record


def main(argv: list[str] | None = None) -> int:
    return stage_main("tracking_store", __doc__, argv, write_record, lambda r: f"tracking store: {r['tracking_uri']}")


if __name__ == "__main__":
    sys.exit(main())
