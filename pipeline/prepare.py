"""The ``prepare`` stage: ``params.yaml: data.*`` → ``data/prepared/`` (the layout is :mod:`drtune.prepared`'s).

python -m pipeline.prepare --params params.yaml
"""

from __future__ import annotations

import json
import sys

from drtune.config import ConfigError
from drtune.prepared import write_prepared
from pipeline.stage import stage_main


def main(argv: list[str] | None = None) -> int:
    def summary(stats: dict) -> str:
        counts = {k: stats["counts"][k] for k in ("train", "val", "test")}
        if stats.get("unlabelled") is not None:
            counts["unlabelled"] = stats["unlabelled"]["count"]
        for warning in stats["checks"]["warnings"]:
            print(f"prepare: warning: {warning}", file=sys.stderr)
        return json.dumps(counts)

    errors = (ConfigError, FileNotFoundError, ValueError)
    return stage_main("prepare", __doc__, argv, lambda p: write_prepared(p.data), summary, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
