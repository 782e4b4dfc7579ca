"""A search script in a fresh interpreter: its private Ray and its MLflow store in ``root`` must not leak into other
tests, and what the script defines there (a method, a patched function) exists nowhere else.

Every script starts with :data:`PREAMBLE`: ``root`` (the first argument), and ``settings(*overrides)``, which loads
``configs/quick.yaml`` with the overrides and an MLflow store in ``root``, and writes its prepared splits under
``root`` (where the stage, run with ``root`` as its working folder, reads them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

QUICK = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"

PREAMBLE = """
import sys
from pathlib import Path
from drtune.prepared import write_prepared
from pipeline import tune
from pipeline.config import load

root = Path(sys.argv[1])
QUICK = sys.argv[2]
TRACKING = f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db"


def settings(*overrides):
    p = load(QUICK, [*overrides, TRACKING])
    data = p.data.model_copy()
    data.prepared_dir = f"{root}/{p.data.prepared_dir}"
    write_prepared(data)
    return p
"""


def run_search_script(script: str, root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``PREAMBLE + script`` with ``root`` as the working folder and ``sys.argv[3:]`` = ``args``; the caller's
    ``MLFLOW_TRACKING_URI`` is dropped, so nothing reaches another store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-c", PREAMBLE + script, str(root), str(QUICK), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
