"""The ``register`` stage: test the search's winner once, log it, register it, gate ``champion``.

    python -m pipeline.register --params params.yaml

1. The chosen model (``models/best.safetensors``: a trial's, the baseline's or a soup, chosen on validation) gets calibrated
   probabilities (one temperature fitted on the validation split, :mod:`drtune.temperature`) and is
   evaluated once on the test split: top-1, balanced accuracy, macro-F1, top-5, per-class precision / recall /
   F1, confusion matrix, expected calibration error before and after the temperature, a reliability diagram.
2. Into the search's parent MLflow run (``models/best.json`` names it) go the test metrics, the CE baseline's test accuracy and
   the lift over it, the confusion matrix, the best trial's learning curves and the search
   landscape, and the inference model (encoder + head) as a pyfunc with a signature and an
   input example, registered under ``mlflow.registered_model`` and aliased ``challenger``.
3. ``champion`` moves to the new version only if it is no worse than plain fine-tuning on test and
   beats the current champion on this same test split. Plain fine-tuning is the CE baseline's model
   (``models/baseline.safetensors``), compared image by image on ``tune.metric`` (McNemar's exact test for
   top-1, a permutation test otherwise: :func:`pipeline.significance.paired`): a challenger that scores below
   the baseline on test is registered but not promoted, whatever the champion. The champion is re-scored here
   rather than trusting a number from another split. The accuracies, the paired test and the
   decision are logged, and written to ``metrics/test.json``.
4. Registering is idempotent: a version carries its checkpoint's SHA-256 (``checkpoint_sha256``)
   from its creation on, so a rerun after an interruption finishes that version (aliases, tags,
   description) instead of registering the same model twice.
5. The version gets a Markdown description (:func:`pipeline.model_card.model_description`: what the model is, its
   hyperparameters, data, test accuracy against CE-tuning, the decision, how to call it) and tags
   with its method and hyperparameters; the registered model's own description is the
   champion's, rewritten whenever a new version becomes champion.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from drtune.evaluation import METRIC_NAMES, per_class
from drtune.inference import load_predictor
from drtune.model_file import read_model, with_temperature
from drtune.prepared import load_prepared
from drtune.temperature import calibration_error, fit_temperature, probabilities, reliability
from pipeline import faults, plots
from pipeline.champion import champion_score, claim, decide
from pipeline.config import PipelineConfig, redact
from pipeline.leaderboard import test_numbers, tested
from pipeline.mlflow_connect import connect, tracking_errors
from pipeline.mlflow_store import run_exists
from pipeline.model_card import hyperparameters, model_description, pretrain_summary
from pipeline.model_version import model_version
from pipeline.pretrained import pretrain_record
from pipeline.selection import BASELINE
from pipeline.significance import paired
from pipeline.stage import stage_main, write_csv


def calibration_numbers(before: list[dict], after: list[dict], temperature: float, n_val: int) -> dict:
    """The temperature and the test split's expected calibration error before and after it, from the
    reliability bins (:func:`drtune.temperature.reliability`) of both."""
    return {
        "temperature": temperature,
        "temperature_fit_images": n_val,
        "test_ece_before": calibration_error(before),
        "test_ece": calibration_error(after),
    }


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path(".")) -> dict:
    tune_summary = json.loads((root / "models" / "best.json").read_text())
    baseline = json.loads((root / "metrics" / "baseline.json").read_text())
    data = load_prepared(root / p.data.prepared_dir)
    test, classes = data.test, data.classes
    pretrained = pretrain_record(p, root)  # the self-supervised start, when the pretrain stage trained one
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    name = p.registered_model()
    plots_dir = root / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    parent = tune_summary["mlflow_parent_run_id"]
    if not run_exists(client, parent):  # before the test split is scored
        raise RuntimeError(
            f"the search's MLflow run {parent} (models/best.json) is not in the tracking store at {redact(p.tracking_uri())}: "
            "the search was tracked in another store (MLFLOW_TRACKING_URI changed?). Point MLFLOW_TRACKING_URI back "
            "to it, or run the search again into this store: DRTUNE_FRESH=1 dvc repro -f -s tune, then dvc repro"
        )
    best = read_model(root / "models" / "best.safetensors")  # read once: its bytes are hashed, loaded and logged
    if best.sha256 != tune_summary.get("best_sha256"):
        raise RuntimeError(
            "models/best.safetensors is not the model models/best.json describes (an interrupted or mixed-up tune "
            "stage?): run the tune stage again (dvc repro)"
        )
    predictor = load_predictor(best)
    # Calibrated probabilities: one temperature fitted on the validation split (drtune.temperature); the
    # registered model file carries it, so its bytes (and checksum) are the calibrated model's.
    predictor.temperature = fit_temperature(predictor.score(data.val)["logits"], data.val.labels)
    best = with_temperature(best, predictor.temperature)
    scores = predictor.score(test)
    before, after = (reliability(probabilities(scores["logits"], t), test.labels) for t in (1.0, predictor.temperature))
    calibration = calibration_numbers(before, after, predictor.temperature, len(data.val))
    plots.reliability_diagram(
        before,
        after,
        plots_dir / "reliability.png",
        f"test ECE {calibration['test_ece_before']:.3f} → {calibration['test_ece']:.3f} (T = {predictor.temperature:.2f})",
    )
    m = tune_summary.get("metric", "top1")  # tune.metric as the search chose by it: the gate and leaderboard use it
    lift = scores[m] - baseline[f"test_{m}"]
    baseline_predicted = load_predictor(root / "models" / "baseline.safetensors").score(test)["predicted"]
    vs_baseline = paired(test.labels, scores["predicted"], baseline_predicted, m, len(classes))
    plots.confusion_matrix(
        scores["confusion"],
        classes,
        plots_dir / "confusion_matrix.png",
        f"test top-1 {scores['top1']:.3f} ({scores['n']} images)",
    )
    version_before, champion_before, note, champion_loads = champion_score(
        client, name, test, classes, tune_summary["data_sha256"], m
    )
    souped = len(tune_summary.get("soup", {}).get("ingredients", [])) > 1  # the released model is a soup
    known = {BASELINE: baseline[f"test_{m}"], **({} if souped else {tune_summary["best_trial"]: scores[m]})}
    board = tested(tune_summary.get("leaderboard", {}), root / "models" / "leaderboard", test, known, m)

    with mlflow.start_run(run_id=parent), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics(
            {
                **{f"test_{k}": scores[k] for k in (*METRIC_NAMES, "top5")},
                f"ce_baseline_test_{m}": baseline[f"test_{m}"],
                "lift_over_ce": lift,
                "lift_over_ce_p": vs_baseline.p_value,
                **calibration,
                **{f"leaderboard.{k}": v for k, v in test_numbers(board, m).items()},
            }
        )
        mlflow.log_dict(
            {
                "columns": ["method", "trials", "completed", "best_trial", f"best_val_{m}", f"test_{m}"],
                "data": [
                    [method, e["trials"], e["completed"], e["best_trial"], e[f"best_val_{m}"], e.get(f"test_{m}")]
                    for method, e in board.items()
                ],
            },
            "leaderboard.json",
        )
        # precision, recall and F1 per class, in the table format of log_table, written whole (log_table appends)
        mlflow.log_dict(
            pd.DataFrame(per_class(scores["confusion"], classes)).to_dict(orient="split"), "per_class_test.json"
        )
        if "checks" in data.stats:  # duplicates and leakage found by prepare (a dataset prepared before: none)
            mlflow.log_dict(data.stats["checks"], "data_checks.json")
        for picture in ("confusion_matrix.png", "reliability.png", "learning_curve.png", "landscape.png"):
            if (plots_dir / picture).is_file():
                mlflow.log_artifact(str(plots_dir / picture), artifact_path="plots")
        registered, onnx_check = model_version(
            client, name, best, predictor, test, Path(tmp), tune_summary["best_sha256"]
        )
        version = str(registered.version)
        faults.interrupt("interrupt_registration")
        client.set_registered_model_alias(name, "challenger", version)

        def judge(champion: tuple) -> tuple[bool, str]:
            if champion[0] == version:  # this very model is the champion already (a rerun)
                return True, "already champion: this model was registered and promoted before"
            return decide(scores[m], champion[1], champion[2], champion[3], vs_baseline, m)

        params = best.params
        tags = {
            **{f"test_{k}": f"{scores[k]:.4f}" for k in METRIC_NAMES},
            "metric": m,
            f"ce_baseline_test_{m}": f"{baseline[f'test_{m}']:.4f}",
            "lift_over_ce": f"{lift:+.4f}",
            "lift_over_ce_p": f"{vs_baseline.p_value:.3g}",
            "temperature": f"{calibration['temperature']:.4f}",
            "test_ece": f"{calibration['test_ece']:.4f}",
            "test_ece_before_calibration": f"{calibration['test_ece_before']:.4f}",
            "selection_rule": tune_summary["selection"]["rule"],
            "data_sha256": tune_summary["data_sha256"],
            "best_trial": tune_summary["best_trial"],
            "source_run": parent,
            "method": params["train"]["method"],
            **({"onnx_max_abs_logit_diff": f"{onnx_check['max_abs_logit_diff']:.2e}"} if onnx_check else {}),
            **{k: str(v) for k, v in hyperparameters(params).items()},
            **({"pretrain": pretrain_summary(pretrained)} if pretrained else {}),
            **({"soup": " + ".join(tune_summary["soup"]["ingredients"])} if souped else {}),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

        def record(decision: str) -> str:
            """The decision on the version (tag and description), written before the alias moves."""
            client.set_model_version_tag(name, version, "decision", decision)
            description = model_description(
                name,
                version,
                params,
                classes,
                data.stats,
                scores,
                baseline[f"test_{m}"],
                decision,
                tune_summary["mlflow_experiment_id"],
                tune_summary["selection"],
                vs_baseline,
                pretrained,
                calibration,
                m,
                tune_summary["soup"] if souped else None,
            )
            client.update_model_version(name, version, description=description)
            return description

        promote, decision = judge((version_before, champion_before, note, champion_loads))
        description = record(decision)
        faults.interrupt("interrupt_before_alias")
        if promote:  # the alias moves last, and only if the champion read above still holds it (or is beaten again)
            promote, changed = claim(
                client,
                name,
                version,
                version_before,
                lambda: champion_score(client, name, test, classes, tune_summary["data_sha256"], m),
                judge,
            )
            if changed:
                decision, description = changed, record(changed)
        if promote:
            client.update_registered_model(name, description=f"Champion: version {version}.\n\n{description}")
        mlflow.set_tags({"registered_version": version, "champion_decision": decision})
        if champion_before is not None:
            mlflow.log_metric(f"champion_test_{m}_before", champion_before)

    write_csv(
        root / "metrics" / "test_predictions.csv",
        [
            {"actual": classes[a], "predicted": classes[b]}
            for a, b in zip(test.labels, scores["predicted"], strict=True)
        ],
    )
    metrics = {
        **{f"test_{k}": scores[k] for k in (*METRIC_NAMES, "top5")},
        "n_test": scores["n"],
        f"ce_baseline_test_{m}": baseline[f"test_{m}"],
        "lift_over_ce": lift,
        "lift_over_ce_p": vs_baseline.p_value,
        "lift_over_ce_low": vs_baseline.interval()[0],
        "lift_over_ce_high": vs_baseline.interval()[1],
        f"champion_test_{m}_before": champion_before,
        "promoted": int(promote),
        **calibration,
        **test_numbers(board, m),
    }
    registered = {
        "metric": m,
        "registered_model": name,
        "version": version,
        "champion_before": version_before,
        "decision": decision,
    }
    (root / "metrics" / "test.json").write_text(json.dumps(metrics, indent=2))  # numbers only: a DVC metrics file
    (root / "models" / "registered.json").write_text(json.dumps(registered, indent=2))
    return metrics | registered


def main(argv: list[str] | None = None) -> int:
    def summary(s: dict) -> str:
        m = s["metric"]
        return (
            f"test {METRIC_NAMES[m]} {s[f'test_{m}']:.4f} (CE-tuning {s[f'ce_baseline_test_{m}']:.4f}, lift "
            f"{s['lift_over_ce']:+.4f}); {s['registered_model']} v{s['version']} @challenger; {s['decision']}"
        )

    return stage_main("register", __doc__, argv, run, summary)


if __name__ == "__main__":
    sys.exit(main())
