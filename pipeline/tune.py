"""The ``tune`` stage: search DR-Tune's hyperparameters, record every trial, keep the best checkpoint.

    python -m pipeline.tune --params params.yaml [--set tune.num_samples=4] [--fresh]

Order matters: parameters are validated, the prepared data is found and the tracking store is
checked (an unreachable server fails here, before Ray starts), then the search runs or, when the
same search was interrupted or had failed trials, resumes (finished trials kept, unfinished and
failed ones continued from their last checkpoints); ``--fresh`` (or ``DRTUNE_FRESH=1``) discards a
stored search instead. After the search every trial's MLflow run is reconciled with Tune's results.

The candidates are the trials that ran every epoch and the CE baseline (the ``baseline`` stage's
model: plain fine-tuning at the defaults, same splits, same epochs). :mod:`pipeline.selection` picks
one: a clear best on validation wins; candidates within the validation noise of the best are first
re-validated (``tune.revalidate: auto``; at most ``tune.finalists`` of them, each trained again on
``tune.finalist_folds`` more held-out folds of the same labelled images, :mod:`drtune.folds`; a grid
of Ray Train runs, resumable like the search) and, if still tied, the baseline wins the tie. The
chosen model is always the candidate's own (the search trial's, or the baseline's).
Outputs:

* ``models/best.pt`` — the chosen model: encoder + head, params, classes, history (its last epoch:
  see :mod:`drtune.evaluation`);
* ``models/leaderboard/<method>.pt`` — each method's best model (CE's may be the baseline), tested by ``register``;
* ``metrics/tune.json`` — numbers only (a DVC metrics file): the winner's validation score and
  hyperparameters, trial counts, the deciding gap in images and its interval, wall time;
* ``models/best.json`` — which candidate won and by which rule, the leaderboard, its MLflow parent run
  and Ray experiment path, the data digest;
* ``metrics/tune_curve.csv``, ``metrics/landscape.csv`` — DVC plots (learning curve, search landscape);
* ``plots/learning_curve.png``, ``plots/landscape.png`` — the same as pictures.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ray import tune
from ray.train import Checkpoint
from ray.tune import Callback

from drtune.config import ConfigError
from drtune.data import ArraySplit
from drtune.folds import extra_fold, max_extra_folds
from drtune.inference import load_predictor, save_inference_checkpoint
from drtune.preflight import preflight
from drtune.prepared import load_prepared
from pipeline import plots
from pipeline.cluster import local_storage, start_ray, storage_filesystem, storage_uri
from pipeline.config import PipelineConfig, load
from pipeline.search import (
    FRESH_HINT,
    METRIC,
    build_finalist_tuner,
    build_tuner,
    cross_validated,
    discard_experiment,
    require_finished,
    trial_candidates,
)
from pipeline.selection import BASELINE, Candidate, Pick, leaderboard, lift, pick, rank, tied_with_best
from pipeline.selection import finalists as selection_finalists
from pipeline.space import searched_names, starting_points, unprefixed
from pipeline.stage import flat, stage_main, write_csv
from pipeline.tracking import (
    TrialRuns,
    connect,
    dataset_inputs,
    discard_parent,
    experiment_id,
    git_commit,
    log_params,
    parent_run,
    run_outcome,
    tracking_errors,
)
from pipeline.training import read_checkpoint, run_name, share_data


class Progress(Callback):
    """The driver's output: one line per trial epoch (rank 0's all-reduced metrics, wherever the
    workers run) and one per finished trial (what the user, and the resume test, watch for)."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "resumed_from_epoch" in result:
            print(f"trial {trial.trial_id} continued from its epoch-{int(result['resumed_from_epoch'])} checkpoint",
                  flush=True)
        if result.get("diverged"):
            return
        print(f"trial {trial.trial_id} epoch {result.get('epoch')}/{self.max_epochs}: val top-1 "
              f"{result.get(METRIC, float('nan')):.4f}, val loss {result.get('val_loss', float('nan')):.4f}, train CE "
              f"{result.get('train_ce', float('nan')):.4f} + reg {result.get('train_reg', float('nan')):.4f}, "
              f"{result.get('epoch_s', float('nan')):.1f} s, {result.get('images_per_s', float('nan')):.0f} images/s",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        r = trial.last_result or {}
        if r.get("diverged"):
            print(f"trial {trial.trial_id} diverged in epoch {r.get('epoch')} ({r.get('error')}); not retried", flush=True)
            return
        how = "completed" if r.get("epoch", 0) >= self.max_epochs else "stopped by ASHA"
        print(f"trial {trial.trial_id} {how} after {r.get('epoch')} epochs: val top-1 {r.get(METRIC, float('nan')):.4f}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial.trial_id} failed (its error is in the trial's MLflow run); the search goes on", flush=True)


def baseline_candidate(root: Path, p: PipelineConfig, data_sha256: str, n_val: int) -> Candidate | None:
    """The CE baseline (the ``baseline`` stage's model) as a candidate, or None when that stage has not run here.

    It must have trained on these splits for these epochs: a baseline of other data or another schedule is
    an error, not a silently unfair comparison."""
    record, model = root / "models" / "baseline.json", root / "models" / "baseline.pt"
    if not (record.is_file() and model.is_file()):
        print("no CE baseline here (models/baseline.json): it is not a candidate; run the baseline stage first "
              "to let plain fine-tuning compete", flush=True)
        return None
    b = json.loads(record.read_text())
    if b["data_sha256"] != data_sha256 or b["epochs"] != p.train.epochs:
        raise ConfigError(f"models/baseline.json was trained on other data or for {b['epochs']} epochs (train.epochs "
                          f"= {p.train.epochs}): run the baseline stage again (dvc repro does)")
    return Candidate(id=BASELINE, method="ce", val_top1=b["val_top1"], val_loss=b["val_loss"], n_val=n_val,
                     config={"method": "ce", "lr_backbone": b["lr_backbone"], "lr_head": b["lr_head"]}, baseline=True,
                     ref=model)


def predictions_on(model: Path | Checkpoint, split: ArraySplit) -> tuple[bool, ...]:
    """Per image of ``split``, whether a final model gets it right (scored here, on the driver, with the
    evaluation transform): an inference checkpoint file (the baseline's), or a trial's Ray checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = (model if isinstance(model, Path) else
                   save_inference_checkpoint(read_checkpoint(model, Path(tmp) / "last.pt"), Path(tmp) / "m.pt"))
        predicted = load_predictor(weights).score(split)["predicted"]
    return tuple(bool(x) for x in np.asarray(predicted) == split.labels)


def near_the_top(candidates: list[Candidate], val: ArraySplit) -> list[Candidate]:
    """``candidates`` with per-image validation results for those the unpaired interval cannot separate from
    the best (the only ones a paired comparison could matter for), so that :mod:`pipeline.selection` compares
    them image by image; scoring a handful of models on the validation split costs seconds."""
    close = {c.id for c in tied_with_best(rank(candidates))}
    return [c.with_right(predictions_on(c.ref, val)) if c.id in close and len(close) > 1 else c for c in candidates]


def choose(p: PipelineConfig, candidates: list[Candidate],
           revalidate: Callable[[list[Candidate]], list[Candidate]]) -> tuple[Pick, list[Candidate]]:
    """The pick (:func:`pipeline.selection.pick`), with the tied candidates re-validated first when
    ``tune.revalidate`` asks for it; ``revalidate(finalists)`` trains them on the extra folds and returns
    them re-validated. Returns the pick and the re-validated finalists (empty when none were)."""
    mode, at_most = p.tune.revalidate, p.tune.finalists
    finalists = (rank(candidates)[:at_most] if mode == "always" else
                 selection_finalists(candidates, at_most) if mode == "auto" else [])
    if len(finalists) < 2:
        return pick(candidates), []
    scored = revalidate(finalists)
    by_id = {c.id: c for c in scored}
    return pick([by_id.get(c.id, c) for c in candidates]), scored


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path("."), fresh: bool = False) -> dict:
    """Run (or resume) the search and write the stage's outputs under ``root``; ``fresh`` first discards
    a stored search of the same settings (its Ray experiment, and its MLflow parent is detached)."""
    data = load_prepared(root / p.data.prepared_dir)
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    starting_points(p)  # validates tune.points_to_evaluate before Ray starts
    folds = max_extra_folds(data.train, data.val)
    if p.tune.revalidate != "never" and p.tune.finalist_folds > folds:
        raise ConfigError(f"tune.finalist_folds = {p.tune.finalist_folds}: the prepared training split holds {folds} "
                          "disjoint folds the size of the validation split (per class); lower it")
    baseline = baseline_candidate(root, p, data.checksum, len(data.val))
    largest = p.library()
    largest.drtune.queue_size = max(p.tune.queue_sizes)
    # Everything a worker would reject, before Ray starts; each trial keeps one checkpoint in storage.
    preflight(largest, local_storage(p, root), field="ray.storage_path",
              checkpoints=p.tune.num_samples + p.tune.finalists * p.tune.finalist_folds + 1)
    start_ray(p)
    storage = storage_uri(p, root)
    ray_run = run_name("search", p, data.checksum)  # the Ray Tune experiment (a folder under storage)
    experiment_path = f"{storage}/{ray_run}"
    mlflow_experiment = experiment_id(client, p.mlflow_experiment())
    if fresh:
        discard_parent(client, mlflow_experiment, experiment_path)
        if discard_experiment(f"{experiment_path}-finalists") | discard_experiment(experiment_path):
            print(f"starting afresh: deleted the search stored at {experiment_path}", flush=True)
    elif tune.Tuner.can_restore(experiment_path):
        print(f"resuming the search stored at {experiment_path}: finished trials are kept, unfinished and failed ones "
              f"continue from their last checkpoints; to {FRESH_HINT}",
              flush=True)
    parent = parent_run(client, mlflow_experiment, experiment_path, run_name=ray_run, tags={
        "git_commit": git_commit(root), "data_sha256": data.checksum, "ray_experiment_path": experiment_path,
        "dataset": p.data.dataset, "method": p.train.method})
    with run_outcome(client, parent):  # FINISHED, KILLED or FAILED: never left RUNNING
        log_params(client, parent, flat(p.model_dump(mode="json", exclude={"mlflow": True})))
        inputs = dataset_inputs(data, p.data.prepared_dir)
        client.log_inputs(parent, datasets=inputs)
        trial_runs = TrialRuns(client, mlflow_experiment, parent, p.train.epochs, inputs)
        progress = Progress(p.train.epochs)
        shared = share_data(data)
        tuner = build_tuner(p, shared, storage, ray_run, [trial_runs, progress])
        start = time.time()
        try:
            results = tuner.fit()
        finally:
            trial_runs.close_open_runs()
        require_finished(results, p.tune.num_samples, f"search interrupted; its state is stored at {experiment_path}")
        trial_runs.reconcile(results)  # every trial's MLflow run as Tune has it, whatever an outage or restore missed
        fs = storage_filesystem(storage)
        candidates = trial_candidates(results, p.train.epochs, len(data.val), p.train.method, fs)
        candidates += [baseline] if baseline else []
        if not rank(candidates):
            raise RuntimeError(f"no trial completed all {p.train.epochs} epochs: {len(results)} trials, "
                               f"{sum(c.status == 'failed' for c in candidates)} failed (their errors are in their MLflow "
                               "runs); fix the cause and run the stage again: failed trials are retried from their last "
                               "checkpoints")
        candidates = near_the_top(candidates, data.val)

        def revalidate(finalists: list[Candidate]) -> list[Candidate]:
            # (tune.revalidate: always takes finalists that near_the_top had no reason to score)
            finalists = [c if c.right is not None else c.with_right(predictions_on(c.ref, data.val)) for c in finalists]
            names = ", ".join(c.id for c in finalists)
            print(f"re-validating {names} on {p.tune.finalist_folds} more held-out folds", flush=True)
            refits = build_finalist_tuner(p, shared, storage, f"{ray_run}-finalists", finalists, [progress]).fit()
            require_finished(refits, len(finalists) * p.tune.finalist_folds,
                             f"re-validation interrupted; its state is stored at {experiment_path}-finalists")
            held_out = {fold: extra_fold(data.train, data.val, fold, p.data.seed)[1]
                        for fold in range(1, p.tune.finalist_folds + 1)}

            def right(refit) -> tuple[bool, ...]:
                return predictions_on(Checkpoint(refit.metrics["checkpoint_path"], filesystem=fs),
                                      held_out[refit.config["fold"]])

            return cross_validated(finalists, refits, p.train.epochs, right)

        chosen, scored = choose(p, candidates, revalidate)
        for c in scored:
            if c.baseline:
                client.log_metric(json.loads((root / "models" / "baseline.json").read_text())["mlflow_run_id"],
                                  "cv_top1", c.cv_top1)
            else:
                trial_runs.log_final(c.id, {"cv_top1": c.cv_top1})
        trial_runs.flush()
        best = chosen.chosen
        print(f"pick: {best.id} ({best.method}), rule {chosen.rule}: {chosen.reason}", flush=True)
        wall = time.time() - start

        models, metrics_dir, plots_dir = root / "models", root / "metrics", root / "plots"
        for d in (models, metrics_dir, plots_dir):
            d.mkdir(parents=True, exist_ok=True)
        methods = list(dict.fromkeys(p.search_methods() + (["ce"] if baseline else [])))
        keys = sorted({name for m in p.search_methods() for name in searched_names(p, m)})
        rows = [{"trial": c.id, "method": c.method, **{k: unprefixed(c.config).get(k) for k in keys},
                 "val_top1": c.val_top1, "epochs": p.train.epochs if c.status == "completed" else
                 int((r.metrics or {}).get("epoch", 0)), "status": c.status}
                for c, r in zip(candidates[:len(results)], results, strict=True)]  # the trials; the baseline is none
        board = leaderboard(candidates, chosen, methods)
        write_leaderboard_models(board, candidates, models / "leaderboard")
        assert board[best.method]["best_trial"] == best.id, (board, best.id)  # the pick is its method's entry
        shutil.copy(models / "leaderboard" / f"{best.method}.pt", models / "best.pt")
        history = torch.load(models / "best.pt", map_location="cpu", weights_only=False)["history"]  # every epoch, resumes included
        curve = [{k: h[k] for k in ("epoch", "val_top1", "val_top5", "val_loss", "train_loss")} for h in history]
        write_csv(metrics_dir / "tune_curve.csv", curve)
        write_csv(metrics_dir / "landscape.csv", rows)
        plots.learning_curves(curve, plots_dir / "learning_curve.png", f"best: {best.id}")
        plots.search_landscape(rows, keys, plots_dir / "landscape.png")
        record = chosen.record()
        gap = record["comparison"] or {}
        # Numbers go to the DVC metrics file; what identifies the winner goes beside its model.
        metrics = {
            "best_val_top1": best.val_top1, "best_val_loss": best.val_loss, "trials": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows), "stopped_early": sum(r["status"] == "stopped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "wall_s": round(wall, 1),
            "best_is_baseline": int(best.baseline), "revalidated": len(scored),
            **({"gap_images": gap["gap_images"], "gap_low": gap["interval"][0], "gap_high": gap["interval"][1]}
               if gap else {}),
            "best": unprefixed(best.config),
            **({"best_cv_top1": best.cv_top1} if best.cv_top1 is not None else {}),
        }
        finalist_rows = [{"trial": c.id, "val_top1": c.val_top1, "cv_top1": c.cv_top1, "folds": c.folds} for c in scored]
        chosen_record = {
            "best_trial": best.id, "best_method": best.method, "best_is_baseline": best.baseline,
            "best_config": best.config, "experiment_path": experiment_path, "leaderboard": board,
            "selection": record, "finalists": finalist_rows,
            "mlflow_parent_run_id": parent, "mlflow_experiment_id": mlflow_experiment, "data_sha256": data.checksum,
        }
        (metrics_dir / "tune.json").write_text(json.dumps(metrics, indent=2))
        board_metrics = leaderboard_numbers(board)
        (metrics_dir / "leaderboard.json").write_text(json.dumps(board_metrics, indent=2))
        (models / "best.json").write_text(json.dumps(chosen_record, indent=2))
        summary = metrics | chosen_record
        client.log_metric(parent, "best_val_top1", best.val_top1)
        client.set_tag(parent, "best_trial", best.id)
        client.set_tag(parent, "best_method", best.method)
        client.set_tag(parent, "selection", chosen.rule)
        client.set_tag(parent, "selection_reason", chosen.reason)
        if gap:
            client.log_metric(parent, "selection_gap_images", gap["gap_images"])
        if best.cv_top1 is not None:
            client.log_metric(parent, "best_cv_top1", best.cv_top1)
        if finalist_rows:
            client.log_dict(parent, pd.DataFrame(finalist_rows).to_dict(orient="split"), "finalists.json")
        client.log_dict(parent, record, "selection.json")
        # the table format of MLflow's log_table, written whole (log_table appends on a rerun)
        client.log_dict(parent, pd.DataFrame([{"method": m, **e} for m, e in board.items()]).to_dict(orient="split"),
                        "leaderboard_val.json")
        for key, value in board_metrics.items():
            client.log_metric(parent, f"leaderboard.{key}", value)
        # The parent's own params are the base params.yaml values; the winner's are logged beside them.
        log_params(client, parent, {f"best.{k}": v for k, v in best.config.items()})
    return summary


def write_leaderboard_models(board: dict[str, dict], candidates: list[Candidate], folder: Path) -> None:
    """Each method's best model as an inference checkpoint, ``folder/<method>.pt``, for the register stage to
    test: a trial's read from its Ray checkpoint (local or remote storage), the baseline's copied."""
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {c.id: c for c in candidates}
    for method, entry in board.items():
        if entry["best_trial"] is None:
            continue
        best = by_id[entry["best_trial"]]
        if best.baseline:
            shutil.copy(best.ref, folder / f"{method}.pt")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            save_inference_checkpoint(read_checkpoint(best.ref, Path(tmp) / "last.pt"), folder / f"{method}.pt")


def leaderboard_numbers(board: dict[str, dict]) -> dict[str, float]:
    """The leaderboard as flat numbers (a DVC metrics file, MLflow metrics): per method its best validation
    top-1 and trial counts, and DR-Tune's lift over the best other method when both ran (negative when it lost)."""
    out = {}
    for method, e in board.items():
        out |= {f"{method}.trials": e["trials"], f"{method}.completed": e["completed"],
                f"{method}.stopped_early": e["stopped_early"]}
        if e["best_val_top1"] is not None:
            out[f"{method}.best_val_top1"] = e["best_val_top1"]
    val_lift = lift({m: e["best_val_top1"] for m, e in board.items()})
    if val_lift is not None:
        out["drtune_val_lift_over_best_other"] = val_lift
    return out


def main(argv: list[str] | None = None) -> int:
    return stage_main("tune", __doc__, argv,
                      lambda path, sets, fresh=False: run(load(path, sets), fresh=fresh or os.environ.get("DRTUNE_FRESH") == "1"),
                      lambda s: json.dumps({k: s[k] for k in ("best_trial", "best_val_top1", "completed", "stopped_early",
                                                              "failed", "wall_s")}),
                      flags={"--fresh": "discard a stored search of the same settings and start it again"})


if __name__ == "__main__":
    sys.exit(main())
