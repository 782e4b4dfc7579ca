"""`pip install drtune` alone: the library and its command work without Ray, MLflow, DVC or Optuna."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIPELINE_ONLY = ("ray", "mlflow", "dvc", "optuna", "boto3", "matplotlib", "psutil")

# Runs in a fresh interpreter in which the pipeline's packages cannot be imported, as after `pip install drtune`.
SCRIPT = f"""
import importlib, pkgutil, sys
BLOCKED = {PIPELINE_ONLY!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not installed by `pip install drtune`)")

sys.meta_path.insert(0, Blocker())
import drtune
for m in pkgutil.iter_modules(drtune.__path__):
    if m.name != "mlflow_model":  # the registered model's code: MLflow itself runs it
        importlib.import_module(f"drtune.{{m.name}}")
from drtune.cli import main
out = sys.argv[1]
sets = ["data.dataset=digits", "data.labels_per_class=10", "model.name=test_efficientnet", "model.pretrained=none",
        "train.image_size=16", "train.batch_size=16", "train.epochs=1", "drtune.queue_size=32", "train.progress=false"]
assert main(["fit", *[a for s in sets for a in ("--set", s)], "--output", out]) == 0
assert main(["export", out, "--output", out + "/model.onnx"]) == 0
code = main(["predict", "models:/drtune-digits@champion", out])
assert code == 2, code  # a registry URI needs MLflow: one clear line, not a traceback
assert not [n for n in sys.modules if n.split(".")[0] in BLOCKED]
"""


def test_the_base_install_lists_none_of_the_pipelines_packages() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {d.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert not base & set(PIPELINE_ONLY), base & set(PIPELINE_ONLY)
    pipeline = {
        d.split("[")[0].split("=")[0].split(">")[0].strip() for d in project["optional-dependencies"]["pipeline"]
    }
    assert {"ray", "mlflow", "dvc", "optuna"} <= pipeline


def test_the_library_fits_exports_and_explains_without_the_pipelines_packages(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registry URIs need MLflow" in done.stderr
