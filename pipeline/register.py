"""The ``register`` stage: test the search's winner once, log it, register it, gate ``champion``.

    python -m pipeline.register --params params.yaml

1. The best trial's checkpoint (``models/best.pt``, chosen on validation) is evaluated once on
   the test split: top-1, top-5, confusion matrix.
2. Into the search's parent MLflow run go the test metrics, the CE baseline's test accuracy and
   the lift over it, the confusion matrix, the best trial's learning curves and the search
   landscape, and the inference model (encoder + head) as a pyfunc with a signature and an
   input example, registered under ``mlflow.registered_model`` and aliased ``challenger``.
3. ``champion`` moves to the new version only if its test accuracy beats the current champion's
   on this same test split — the champion is re-scored here rather than trusting a number from
   another split. Both accuracies and the decision are logged, and written to ``metrics/test.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from drtune.inference import load_predictor
from drtune.prepared import load_prepared
from pipeline import plots
from pipeline.config import PipelineConfig, load
from pipeline.serving import SIGNATURE, DRTuneClassifier
from pipeline.stage import stage_main, write_csv
from pipeline.tracking import connect

CODE_PATHS = [str(Path(__file__).resolve().parents[1] / "drtune"), str(Path(__file__).resolve().parent)]


def champion_score(client: MlflowClient, name: str, test, classes: list[str]) -> tuple[str | None, float | None, str]:
    """(version, test top-1 on *this* test split, note) of the current champion, if comparable."""
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None, "no champion yet"
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictor = champion.unwrap_python_model().predictor
    if predictor.classes != classes:
        return version.version, None, "champion was trained on other classes; not comparable"
    return version.version, predictor.score(test)["top1"], "re-scored on this test split"


def decide(new: float, current: float | None, note: str) -> tuple[bool, str]:
    """Promote when there is no champion or the new model is strictly better on the same split."""
    if current is None:
        return note == "no champion yet", f"promoted: {note}" if note == "no champion yet" else f"kept champion: {note}"
    if new > current:
        return True, f"promoted: test top-1 {new:.4f} > champion's {current:.4f}"
    return False, f"kept champion: test top-1 {new:.4f} ≤ champion's {current:.4f}"


def run(p: PipelineConfig, root: Path = Path(".")) -> dict:
    tune_summary = json.loads((root / "metrics" / "tune.json").read_text())
    baseline = json.loads((root / "metrics" / "baseline.json").read_text())
    data = load_prepared(root / p.data.prepared_dir)
    test, classes = data.test, data.classes
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    name = p.registered_model()
    plots_dir = root / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    predictor = load_predictor(root / "models" / "best.pt")
    scores = predictor.score(test)
    lift = scores["top1"] - baseline["test_top1"]
    plots.confusion_matrix(scores["confusion"], classes, plots_dir / "confusion_matrix.png",
                           f"test top-1 {scores['top1']:.3f} ({scores['n']} images)")
    version_before, champion_top1, note = champion_score(client, name, test, classes)

    parent = tune_summary["mlflow_parent_run_id"]
    with mlflow.start_run(run_id=parent), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics({"test_top1": scores["top1"], "test_top5": scores["top5"],
                            "ce_baseline_test_top1": baseline["test_top1"], "lift_over_ce": lift})
        for picture in ("confusion_matrix.png", "learning_curve.png", "landscape.png"):
            if (plots_dir / picture).is_file():
                mlflow.log_artifact(str(plots_dir / picture), artifact_path="plots")
        weights = Path(tmp) / "inference.pt"
        shutil.copy(root / "models" / "best.pt", weights)
        example = test.images[:2] if test.images.shape[-1] == 3 else np.repeat(test.images[:2], 3, axis=-1)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=DRTuneClassifier(), artifacts={"checkpoint": str(weights)},
            signature=SIGNATURE, input_example=example, code_paths=CODE_PATHS, registered_model_name=name,
            pip_requirements=_requirements(),
        )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, "challenger", version)
        promote, decision = decide(scores["top1"], champion_top1, note)
        if promote:
            client.set_registered_model_alias(name, "champion", version)
        tags = {"test_top1": f"{scores['top1']:.4f}", "ce_baseline_test_top1": f"{baseline['test_top1']:.4f}",
                "lift_over_ce": f"{lift:+.4f}", "data_sha256": tune_summary["data_sha256"], "decision": decision,
                "best_trial": tune_summary["best_trial"], "source_run": parent}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        mlflow.set_tags({"registered_version": version, "champion_decision": decision})
        if champion_top1 is not None:
            mlflow.log_metric("champion_test_top1_before", champion_top1)

    write_csv(root / "metrics" / "test_predictions.csv",
              [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(test.labels, scores["predicted"], strict=True)])
    summary = {"test_top1": scores["top1"], "test_top5": scores["top5"], "n_test": scores["n"],
               "ce_baseline_test_top1": baseline["test_top1"], "lift_over_ce": lift, "registered_model": name,
               "version": version, "champion_before": version_before, "champion_test_top1_before": champion_top1,
               "promoted": promote, "decision": decision}
    (root / "metrics" / "test.json").write_text(json.dumps(summary, indent=2))
    return summary


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "timm", "numpy", "pandas", "mlflow")]


def main(argv: list[str] | None = None) -> int:
    return stage_main("register", __doc__, argv, lambda path, sets: run(load(path, sets)), lambda s: (
        f"test top-1 {s['test_top1']:.4f} (CE-tuning {s['ce_baseline_test_top1']:.4f}, lift {s['lift_over_ce']:+.4f}); "
        f"{s['registered_model']} v{s['version']} @challenger; {s['decision']}"))


if __name__ == "__main__":
    sys.exit(main())
