"""The ``prepare`` stage: ``params.yaml: data.*`` → ``data/prepared/`` (the layout is :mod:`drtune.prepared`'s).

    python -m pipeline.prepare --params params.yaml
"""

from __future__ import annotations

import json
import sys

from drtune.config import ConfigError
from drtune.prepared import write_prepared
from pipeline.config import load
from pipeline.stage import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare", __doc__, argv, lambda path, sets: write_prepared(load(path, sets).data),
                      lambda stats: json.dumps({k: stats["counts"][k] for k in ("train", "val", "test")}),
                      errors=(ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
