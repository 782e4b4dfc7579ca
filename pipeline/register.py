"""The ``register`` stage: test the search's winner once, log it, register it, gate ``champion``.

    python -m pipeline.register --params params.yaml

1. The best trial's checkpoint (``models/best.pt``, chosen on validation) is evaluated once on
   the test split: top-1, top-5, confusion matrix.
2. Into the search's parent MLflow run (``models/best.json`` names it) go the test metrics, the CE baseline's test accuracy and
   the lift over it, the confusion matrix, the best trial's learning curves and the search
   landscape, and the inference model (encoder + head) as a pyfunc with a signature and an
   input example, registered under ``mlflow.registered_model`` and aliased ``challenger``.
3. ``champion`` moves to the new version only if it is no worse than plain fine-tuning on test and
   beats the current champion on this same test split. Plain fine-tuning is the CE baseline's model
   (``models/baseline.pt``), compared image by image (McNemar's exact test,
   :func:`pipeline.selection.paired_test`): a challenger that gets fewer test images right than the
   baseline is registered but not promoted, whatever the champion. The champion is re-scored here
   rather than trusting a number from another split. The accuracies, the paired test and the
   decision are logged, and written to ``metrics/test.json``.
4. Registering is idempotent: a version carries its checkpoint's SHA-256 (``checkpoint_sha256``)
   from its creation on, so a rerun after an interruption finishes that version (aliases, tags,
   description) instead of registering the same model twice.
5. The version gets a Markdown description (:func:`model_description`: what the model is, its
   hyperparameters, data, test accuracy against CE-tuning, the decision, how to call it) and tags
   with its method and hyperparameters; the registered model's own description is the
   champion's, rewritten whenever a new version becomes champion.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from drtune import mlflow_model
from drtune.export import export_onnx
from drtune.inference import load_predictor
from drtune.mlflow_model import SIGNATURE, model_metadata
from drtune.prepared import load_prepared
from pipeline import faults, plots
from pipeline.config import PipelineConfig, load
from pipeline.selection import BASELINE, PairedTest, paired_test
from pipeline.selection import lift as lift_over_others
from pipeline.stage import stage_main, write_csv
from pipeline.tracking import connect, tracking_errors

CHECKSUM_TAG = "checkpoint_sha256"
# Models-from-code: the pyfunc is this file, run by MLflow at load time, with drtune as its only code.
MODEL_CODE = mlflow_model.__file__
CODE_PATHS = [str(Path(mlflow_model.__file__).parent)]


def champion_score(client: MlflowClient, name: str, test, classes: list[str],
                   data_sha256: str) -> tuple[str | None, float | None, str, bool]:
    """(version, test top-1 on *this* test split, note, whether it loads) of the current champion, if comparable.

    The champion is re-scored here. One registered by an older release of this project may not load
    with today's code (its pickled model named modules that have moved); then its recorded test
    top-1 stands in when it was measured on this same prepared data, else it is not comparable.
    """
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None, "no champion yet", True
    try:
        predictor = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().predictor
    except Exception as err:  # noqa: BLE001 - whatever an old model's loading raises
        recorded = version.tags.get("test_top1")
        if recorded is not None and version.tags.get("data_sha256") == data_sha256:
            return (str(version.version), float(recorded), "champion's recorded test top-1 on this same data "
                    f"(it does not load with this code: {type(err).__name__})", False)
        return (str(version.version), None, f"champion does not load with this code ({type(err).__name__}); "
                "not comparable", False)
    if predictor.classes != classes:
        return str(version.version), None, "champion was trained on other classes; not comparable", True
    return str(version.version), predictor.score(test)["top1"], "re-scored on this test split", True


def leaderboard_test(board: dict[str, dict], folder: Path, test, known: dict[str, float]) -> dict[str, dict]:
    """The search's leaderboard with each method's best model tested once on ``test`` (``test_top1``);
    ``known`` maps trial ids already tested (the champion candidate) to their test top-1."""
    out = {}
    for method, entry in board.items():
        trial, checkpoint = entry["best_trial"], folder / f"{method}.pt"
        if trial in known:
            entry = entry | {"test_top1": known[trial]}
        elif trial and checkpoint.is_file():
            entry = entry | {"test_top1": load_predictor(checkpoint).score(test)["top1"]}
        out[method] = entry
    return out


def board_numbers(board: dict[str, dict]) -> dict[str, float]:
    """Per method its best model's test top-1, and DR-Tune's test lift over the best other method (can be negative)."""
    out = {f"{m}.test_top1": e["test_top1"] for m, e in board.items() if "test_top1" in e}
    test_lift = lift_over_others({m: e.get("test_top1") for m, e in board.items()})
    if test_lift is not None:
        out["drtune_test_lift_over_best_other"] = test_lift
    return out


def example_batch(split, n: int) -> np.ndarray:
    """The first ``n`` images of ``split`` as the model takes them: uint8 N × H × W × 3."""
    images = split.images[:n]
    return images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)


def registered_version(client: MlflowClient, name: str, checksum: str):
    """The version of ``name`` registered from the inference checkpoint with this SHA-256, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(CHECKSUM_TAG) == checksum), None)


def decide(new: float, current: float | None, note: str, champion_loads: bool = True,
           vs_baseline: PairedTest | None = None) -> tuple[bool, str]:
    """Whether the challenger becomes champion, and why, in words.

    First the gate against plain fine-tuning: a challenger that gets fewer test images right than the
    CE baseline's model (``vs_baseline``: challenger against baseline on the same images) is never
    promoted. Then the champion: promote when there is none or the new model is strictly better on the
    same split; a tie promotes too when the champion no longer loads (a model people can use beats an
    equal one they cannot)."""
    if vs_baseline is not None and vs_baseline.only_b > vs_baseline.only_a:
        t = vs_baseline
        noise = "beyond the noise" if t.p_value < 0.05 else "within the noise, but a gate takes no chances"
        return False, (f"not promoted: the search did not beat plain fine-tuning on this data: CE-tuning's model is "
                       f"better on test ({t.only_b - t.only_a} more of {t.n} images right, {t.difference:+.4f}; "
                       f"McNemar p = {t.p_value:.3g}, {noise})")
    if current is None:
        return note == "no champion yet", f"promoted: {note}" if note == "no champion yet" else f"kept champion: {note}"
    if new > current or (new == current and not champion_loads):
        relation = ">" if new > current else "= (the champion no longer loads)"
        return True, f"promoted: test top-1 {new:.4f} {relation} champion's {current:.4f}"
    return False, f"kept champion: test top-1 {new:.4f} ≤ champion's {current:.4f}"


# The hyperparameters a version states (resolved: the numbers that trained it), per method.
STATED = {"drtune": ("drtune.lam", "drtune.queue_size"), "l2sp": ("baselines.l2sp_alpha", "baselines.l2sp_beta"),
          "bss": ("baselines.bss_eta",)}
COMMON = ("train.lr_backbone", "train.lr_head", "train.weight_decay", "train.epochs", "train.batch_size",
          "train.optimizer")


def hyperparameters(params: dict) -> dict[str, object]:
    """The trained model's method-specific and common hyperparameters, from its checkpoint's resolved params."""
    method = params["train"]["method"]
    keys = STATED.get(method, ()) + tuple(k for k in COMMON if not (method == "linear_probe" and k == "train.lr_backbone"))
    return {key: params[key.split(".")[0]][key.split(".")[1]] for key in keys}


def model_description(name: str, version: str, params: dict, classes: list[str], stats: dict, scores: dict,
                      baseline_top1: float, decision: str, experiment_id: str | None = None,
                      selection: dict | None = None, vs_baseline: PairedTest | None = None) -> str:
    """The Markdown a person reads on the registry page: what the model is, how good, how to call it."""
    method = {"drtune": "DR-Tune (distribution regularisation + semantic calibration)", "ce": "CE-tuning",
              "linear_probe": "linear probe", "l2sp": "L2-SP", "bss": "BSS"}[params["train"]["method"]]
    rows = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in hyperparameters(params).items())
    counts = {split: sum(stats["counts"][split]) for split in ("train", "val", "test")}
    shown = ", ".join(classes[:12]) + (f", … ({len(classes)} in all)" if len(classes) > 12 else "")
    size = params["train"]["image_size"]
    lift = scores["top1"] - baseline_top1
    # MLflow 3.17's UI picks the experiment view from its GenAI / Model training switch, not from the
    # experiment's kind tag; this link opens the training runs directly.
    paired = ""
    if vs_baseline is not None:
        low, high = vs_baseline.interval()
        paired = (f" (paired on the same images: {vs_baseline.only_a} right only by this model, {vs_baseline.only_b} only "
                  f"by CE-tuning's; 95 % interval [{low:+.4f}, {high:+.4f}], McNemar p = {vs_baseline.p_value:.3g})")
    runs = (f"\n\nThe search's trials and the CE baseline: [training runs](#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning)." if experiment_id else "")
    return f"""**{params["model"]["name"]}** (weights: `{params["model"]["pretrained"]}`) fine-tuned with **{method}**.

| hyperparameter | value |
|---|---|
{rows}

**Data**: `{stats["dataset"]}`, {len(classes)} classes ({shown}); {counts["train"]} training,
{counts["val"]} validation and {counts["test"]} test images (data digest `{stats["sha256"]["train"][:16]}`).
**Input**: images of any size, resized and centre-cropped to {size} × {size} px (RGB; grey images are repeated).

**Why this model** ({selection["rule"] if selection else "validation"} pick): {selection["reason"] if selection else "best on validation"}.

**Test top-1 {scores["top1"]:.4f}** (top-5 {scores["top5"]:.4f}, {scores["n"]} images) against the CE-tuning
baseline's {baseline_top1:.4f}: lift **{lift:+.4f}**{paired}. Champion decision for version {version}: {decision}.{runs}

```python
import mlflow
model = mlflow.pyfunc.load_model("models:/{name}@champion")
model.predict(images)  # uint8 N × H × W × C (0–255) → label, class_index, probability, probabilities
```

Serve it: `mlflow models serve -m "models:/{name}@champion" -p 5001 --env-manager local`
"""


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path(".")) -> dict:
    tune_summary = json.loads((root / "models" / "best.json").read_text())
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
    baseline_predicted = load_predictor(root / "models" / "baseline.pt").score(test)["predicted"]
    vs_baseline = paired_test(list(np.asarray(scores["predicted"]) == test.labels),
                              list(np.asarray(baseline_predicted) == test.labels))
    plots.confusion_matrix(scores["confusion"], classes, plots_dir / "confusion_matrix.png",
                           f"test top-1 {scores['top1']:.3f} ({scores['n']} images)")
    version_before, champion_top1, note, champion_loads = champion_score(client, name, test, classes,
                                                                         tune_summary["data_sha256"])
    board = leaderboard_test(tune_summary.get("leaderboard", {}), root / "models" / "leaderboard", test,
                             {tune_summary["best_trial"]: scores["top1"], BASELINE: baseline["test_top1"]})

    parent = tune_summary["mlflow_parent_run_id"]
    with mlflow.start_run(run_id=parent), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics({"test_top1": scores["top1"], "test_top5": scores["top5"],
                            "ce_baseline_test_top1": baseline["test_top1"], "lift_over_ce": lift,
                            "lift_over_ce_mcnemar_p": vs_baseline.p_value,
                            **{f"leaderboard.{k}": v for k, v in board_numbers(board).items()}})
        mlflow.log_dict({"columns": ["method", "trials", "completed", "best_trial", "best_val_top1", "test_top1"],
                         "data": [[m, e["trials"], e["completed"], e["best_trial"], e["best_val_top1"], e.get("test_top1")]
                                  for m, e in board.items()]}, "leaderboard.json")
        for picture in ("confusion_matrix.png", "learning_curve.png", "landscape.png"):
            if (plots_dir / picture).is_file():
                mlflow.log_artifact(str(plots_dir / picture), artifact_path="plots")
        weights = Path(tmp) / "inference.pt"
        shutil.copy(root / "models" / "best.pt", weights)
        example = example_batch(test, 2)
        checksum = hashlib.sha256(weights.read_bytes()).hexdigest()
        registered = registered_version(client, name, checksum)
        onnx_check = export_onnx(predictor, Path(tmp) / "model.onnx", example_batch(test, 16))
        if registered is None:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MODEL_CODE, artifacts={"checkpoint": str(weights),
                                                                  "onnx": str(Path(tmp) / "model.onnx")},
                signature=SIGNATURE, input_example=example, code_paths=CODE_PATHS, pip_requirements=_requirements(),
                metadata=model_metadata(classes, predictor.image_size, predictor.data_cfg) | {"onnx_check": onnx_check},
            )
            # The checksum is a tag of the version from its creation on: an interrupted registration is
            # finished by the next run, not registered twice.
            registered = mlflow.register_model(info.model_uri, name, tags={CHECKSUM_TAG: checksum})
        version = str(registered.version)
        faults.interrupt("interrupt_registration")
        client.set_registered_model_alias(name, "challenger", version)
        if version_before == version:  # this very model is the champion already (a rerun)
            promote, decision = True, "already champion: this model was registered and promoted before"
        else:
            promote, decision = decide(scores["top1"], champion_top1, note, champion_loads, vs_baseline)
        if promote:
            client.set_registered_model_alias(name, "champion", version)
        params = torch.load(root / "models" / "best.pt", map_location="cpu", weights_only=False)["params"]
        tags = {"test_top1": f"{scores['top1']:.4f}", "ce_baseline_test_top1": f"{baseline['test_top1']:.4f}",
                "lift_over_ce": f"{lift:+.4f}", "lift_over_ce_mcnemar_p": f"{vs_baseline.p_value:.3g}",
                "selection_rule": tune_summary["selection"]["rule"], "data_sha256": tune_summary["data_sha256"], "decision": decision,
                "best_trial": tune_summary["best_trial"], "source_run": parent, "method": params["train"]["method"],
                "onnx_max_abs_logit_diff": f"{onnx_check['max_abs_logit_diff']:.2e}",
                **{k: str(v) for k, v in hyperparameters(params).items()}}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        description = model_description(name, version, params, classes, data.stats, scores, baseline["test_top1"],
                                        decision, tune_summary["mlflow_experiment_id"], tune_summary["selection"],
                                        vs_baseline)
        client.update_model_version(name, version, description=description)
        if promote:
            client.update_registered_model(name, description=f"Champion: version {version}.\n\n{description}")
        mlflow.set_tags({"registered_version": version, "champion_decision": decision})
        if champion_top1 is not None:
            mlflow.log_metric("champion_test_top1_before", champion_top1)

    write_csv(root / "metrics" / "test_predictions.csv",
              [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(test.labels, scores["predicted"], strict=True)])
    metrics = {"test_top1": scores["top1"], "test_top5": scores["top5"], "n_test": scores["n"],
               "ce_baseline_test_top1": baseline["test_top1"], "lift_over_ce": lift,
               "lift_over_ce_mcnemar_p": vs_baseline.p_value, "lift_over_ce_low": vs_baseline.interval()[0],
               "lift_over_ce_high": vs_baseline.interval()[1], "champion_test_top1_before": champion_top1, "promoted": int(promote), **board_numbers(board)}
    registered = {"registered_model": name, "version": version, "champion_before": version_before, "decision": decision}
    (root / "metrics" / "test.json").write_text(json.dumps(metrics, indent=2))  # numbers only: a DVC metrics file
    (root / "models" / "registered.json").write_text(json.dumps(registered, indent=2))
    return metrics | registered


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "timm", "numpy", "pandas", "mlflow", "pydantic",
                                                 "pyyaml", "onnx", "onnxruntime")]


def main(argv: list[str] | None = None) -> int:
    return stage_main("register", __doc__, argv, lambda path, sets: run(load(path, sets)), lambda s: (
        f"test top-1 {s['test_top1']:.4f} (CE-tuning {s['ce_baseline_test_top1']:.4f}, lift {s['lift_over_ce']:+.4f}); "
        f"{s['registered_model']} v{s['version']} @challenger; {s['decision']}"))


if __name__ == "__main__":
    sys.exit(main())
