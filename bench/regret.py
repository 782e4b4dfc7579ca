"""Selection regret: what choosing on the small validation split costs on test, and what re-validating
the finalists on more folds of the same labels (``tune.finalists``) gives back.

    python bench/regret.py                    # the search the tune stage last ran (models/best.json)
    python bench/regret.py --experiment       # a search made to measure it (below); resumable

The regret of a rule is the best test top-1 among the trials it could choose from minus the test
top-1 of the trial it chose. The pipeline never looks at test while it searches; only this
benchmark does. Rules compared on the same trials:

* validation pick: highest final validation top-1 (ties: lower validation loss), the pipeline's
  rule with ``tune.finalists: 0``;
* cross-validated pick of the top k: the k best trials by that order are re-validated on
  ``tune.finalist_folds`` more held-out folds (:mod:`drtune.folds`) and the highest mean over
  all folds wins, the rule with ``tune.finalists: k``. Only the trials the search re-validated
  can be scored, so k runs up to the search's own ``tune.finalists``.

``--experiment`` runs the tune stage's own code (:func:`pipeline.tune.run`) on the default problem
under ``runs/bench/regret/`` (its own Ray storage and MLflow store): 6 trials, each run to the end
(no early stopping), so the validation pick chooses among 6; the top 3 re-validated on 2 more folds,
so the cross-validated pick of the top 2 and of the top 3 can be scored on the same trials.
Results go to ``bench/results/regret[-experiment].json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

EXPERIMENT = ["tune.early_stopping=false", "tune.num_samples=6", "tune.finalists=3", "tune.finalist_folds=2",
              "train.progress=false"]


def pick(trials: list[dict], finalists: int = 0) -> dict:
    """The trial a rule chooses from ``trials`` (dicts with ``val_top1``, ``val_loss`` and, for the top
    ``finalists``, ``cv_top1``): the validation pick, or with ``finalists`` ≥ 2 the best ``cv_top1``
    among the first ``finalists`` in validation order (ties: the earlier one)."""
    order = sorted(trials, key=lambda t: (-t["val_top1"], t["val_loss"]))
    if finalists < 2:
        return order[0]
    top = order[:finalists]
    return max(top, key=lambda t: (t["cv_top1"], -top.index(t)))


def selection_regret(trials: list[dict], finalists: int = 0) -> float:
    """``max test_top1 − test_top1 of the rule's pick`` over ``trials`` (see :func:`pick`)."""
    return max(t["test_top1"] for t in trials) - pick(trials, finalists)["test_top1"]


def tested_trials(chosen: dict, p, test) -> list[dict]:
    """Every trial of the search in ``chosen`` (a ``models/best.json``) that ran all epochs: its validation
    scores, its cross-validated score when it was a finalist, and its final model's test top-1."""
    from ray.train import Checkpoint
    from ray.tune import ExperimentAnalysis

    from drtune.inference import load_predictor, save_inference_checkpoint
    from pipeline.cluster import storage_filesystem
    from pipeline.training import read_checkpoint

    path = chosen["experiment_path"]
    cv = {row["trial"]: row["cv_top1"] for row in chosen.get("finalists", [])}
    analysis = ExperimentAnalysis(path, storage_filesystem=storage_filesystem(path))
    trials = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        if last.get("epoch", 0) < p.train.epochs or "checkpoint_path" not in last:
            continue
        checkpoint = Checkpoint(last["checkpoint_path"], filesystem=storage_filesystem(path))  # the Train run's
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_inference_checkpoint(read_checkpoint(checkpoint, Path(tmp) / "last.pt"),
                                                Path(tmp) / "inference.pt")
            test_top1 = load_predictor(weights).score(test)["top1"]
        trials.append({"trial": trial.trial_id, "val_top1": last["val_top1"], "val_loss": last["val_loss"],
                       **({"cv_top1": cv[trial.trial_id]} if trial.trial_id in cv else {}), "test_top1": test_top1})
    return trials


def report(trials: list[dict], test_size: int) -> dict:
    """Print each trial and each rule's regret; the regrets as a dict (``validation``, ``cv_top<k>``)."""
    best = max(trials, key=lambda t: t["test_top1"])
    scored = sum("cv_top1" in t for t in trials)
    print(f"{'trial':<10} {'val top-1':>9} {'val loss':>8} {'cv top-1':>8} {'test top-1':>10}")
    for t in sorted(trials, key=lambda t: (-t["val_top1"], t["val_loss"])):
        mark = " ← best on test" if t is best else ""
        cv = f"{t['cv_top1']:>8.4f}" if "cv_top1" in t else f"{'–':>8}"
        print(f"{t['trial']:<10} {t['val_top1']:>9.4f} {t['val_loss']:>8.4f} {cv} {t['test_top1']:>10.4f}{mark}")
    regrets = {"validation": selection_regret(trials)}
    print(f"\n{len(trials)} trials ran every epoch; {test_size} test images\n\n| rule | pick | test top-1 | regret |\n|---|---|---|---|")
    for k in [0] + list(range(2, scored + 1)):
        chosen = pick(trials, k)
        name = "validation pick" if k == 0 else f"cross-validated top {k}"
        regret = selection_regret(trials, k)
        regrets["validation" if k == 0 else f"cv_top{k}"] = regret
        print(f"| {name} | {chosen['trial']} | {chosen['test_top1']:.4f} | {regret:.4f} |")
    return regrets


def main() -> None:
    from drtune.prepared import load_prepared
    from pipeline.config import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--experiment", action="store_true", help="run the measuring search under runs/bench/regret/")
    args = parser.parse_args()
    if args.experiment:
        from pipeline.tune import run

        root = Path("runs/bench/regret").resolve()
        root.mkdir(parents=True, exist_ok=True)
        p = load(args.params, EXPERIMENT + [f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
        p.data.prepared_dir = str(Path(p.data.prepared_dir).resolve())  # the prepare stage's output, read in place
        if not (root / "models" / "best.json").exists():
            run(p, root)
        chosen, out = json.loads((root / "models" / "best.json").read_text()), "bench/results/regret-experiment.json"
    else:
        p = load(args.params, [])
        chosen, out = json.loads(Path("models/best.json").read_text()), "bench/results/regret.json"
    test = load_prepared(Path(p.data.prepared_dir)).test
    trials = tested_trials(chosen, p, test)
    regrets = report(trials, len(test))
    Path(out).write_text(json.dumps({"experiment": chosen["experiment_path"], "settings": EXPERIMENT if args.experiment
                                     else None, "trials": trials, "regret": regrets}, indent=1))


if __name__ == "__main__":
    main()
