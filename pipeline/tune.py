"""The ``tune`` stage: search DR-Tune's hyperparameters, record every trial, keep the best checkpoint.

    python -m pipeline.tune --params params.yaml [--set tune.num_samples=4] [--fresh]

Order matters: parameters are validated, the prepared data is found and the tracking store is
checked (an unreachable server fails here, before Ray starts), then the search runs or, when the
same search was interrupted or had failed trials, resumes (finished trials kept, unfinished and
failed ones continued from their last checkpoints); ``--fresh`` (or ``DRTUNE_FRESH=1``) discards a
stored search instead. After the search every trial's MLflow run is reconciled with Tune's results.
With ``tune.finalists`` = N ≥ 2 the N best completed trials are then trained again on
``tune.finalist_folds`` more held-out folds of the same labelled images (:mod:`drtune.folds`; a grid
of Ray Train runs, resumable like the search) and the pick is the best mean validation top-1 over
all folds; its model is still the search trial's own.
Outputs:

* ``models/best.pt`` — the best trial's final model: encoder + head, params, classes, history
  (the trial chosen by :func:`pipeline.search.select_best`, its last epoch: see :mod:`drtune.evaluation`);
* ``metrics/tune.json`` — numbers only (a DVC metrics file): the winner's validation score and
  hyperparameters, trial counts, wall time;
* ``models/best.json`` — which trial won, its MLflow parent run and Ray experiment path, the data digest;
* ``metrics/tune_curve.csv``, ``metrics/landscape.csv`` — DVC plots (learning curve, search landscape);
* ``plots/learning_curve.png``, ``plots/landscape.png`` — the same as pictures.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from ray import tune
from ray.tune import Callback

from drtune.config import ConfigError
from drtune.folds import max_extra_folds
from drtune.inference import save_inference_checkpoint
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
    cross_validated_pick,
    discard_experiment,
    ranked,
    require_finished,
    select_best,
)
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


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path("."), fresh: bool = False) -> dict:
    """Run (or resume) the search and write the stage's outputs under ``root``; ``fresh`` first discards
    a stored search of the same settings (its Ray experiment, and its MLflow parent is detached)."""
    data = load_prepared(root / p.data.prepared_dir)
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    starting_points(p)  # validates tune.points_to_evaluate before Ray starts
    folds = max_extra_folds(data.train, data.val)
    if p.tune.finalists and p.tune.finalist_folds > folds:
        raise ConfigError(f"tune.finalist_folds = {p.tune.finalist_folds}: the prepared training split holds {folds} "
                          "disjoint folds the size of the validation split (per class); lower it")
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
        best = select_best(results, p.train.epochs, storage_filesystem(storage))
        finalists = ranked(results, p.train.epochs, storage_filesystem(storage))[:p.tune.finalists]
        scores = []
        if len(finalists) > 1:  # re-validate the top trials on more held-out folds of the same labels
            print(f"re-validating the top {len(finalists)} trials on {p.tune.finalist_folds} more held-out folds", flush=True)
            refits = build_finalist_tuner(p, shared, storage, f"{ray_run}-finalists", finalists, [progress]).fit()
            require_finished(refits, len(finalists) * p.tune.finalist_folds,
                             f"re-validation interrupted; its state is stored at {experiment_path}-finalists")
            scores = cross_validated(finalists, refits, p.train.epochs)
            best = cross_validated_pick(finalists, scores)
            for row in scores:
                trial_runs.log_final(row["trial"], {"cv_top1": row["cv_top1"]})
            trial_runs.flush()
        wall = time.time() - start

        models, metrics_dir, plots_dir = root / "models", root / "metrics", root / "plots"
        for d in (models, metrics_dir, plots_dir):
            d.mkdir(parents=True, exist_ok=True)
        methods = p.search_methods()
        keys = sorted({name for m in methods for name in searched_names(p, m)})
        rows = []
        for r in results:
            m = r.metrics or {}
            status = "failed" if r.error is not None or m.get("diverged") else ("completed" if m.get("epoch", 0) >= p.train.epochs else "stopped")
            values = unprefixed(r.config)
            rows.append({"trial": m.get("trial_id", "?"), "method": r.config.get("method", p.train.method),
                         **{k: values.get(k) for k in keys},
                         "val_top1": float(m.get(METRIC, math.nan)), "epochs": int(m.get("epoch", 0)), "status": status})
        board = leaderboard(results, rows, methods, p, storage, models / "leaderboard",
                            {row["trial"]: row["cv_top1"] for row in scores})
        best_method = best.config.get("method", p.train.method)
        # The overall pick is its method's pick (the same rule over the same trials in the same order),
        # so its inference model is on disk already: copied, not read from storage a second time.
        shutil.copy(models / "leaderboard" / f"{best_method}.pt", models / "best.pt")
        history = torch.load(models / "best.pt", map_location="cpu", weights_only=False)["history"]  # every epoch, resumes included
        curve = [{k: h[k] for k in ("epoch", "val_top1", "val_top5", "val_loss", "train_loss")} for h in history]
        write_csv(metrics_dir / "tune_curve.csv", curve)
        write_csv(metrics_dir / "landscape.csv", rows)
        plots.learning_curves(curve, plots_dir / "learning_curve.png", f"best trial {best.trial_id}")
        plots.search_landscape(rows, keys, plots_dir / "landscape.png")
        # Numbers go to the DVC metrics file; what identifies the winner goes beside its model.
        metrics = {
            "best_val_top1": best.metrics[METRIC], "best_val_loss": best.metrics["val_loss"], "trials": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows), "stopped_early": sum(r["status"] == "stopped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "wall_s": round(wall, 1),
            "best": unprefixed(best.config),
            **({"best_cv_top1": next(r["cv_top1"] for r in scores if r["trial"] == best.trial_id),
                "finalists": len(scores)} if scores else {}),
        }
        chosen = {
            "best_trial": best.trial_id, "best_method": best_method,
            "best_config": best.config, "experiment_path": experiment_path, "leaderboard": board,
            "selection": "cross-validated finalists" if scores else "validation split", "finalists": scores,
            "mlflow_parent_run_id": parent, "mlflow_experiment_id": mlflow_experiment, "data_sha256": data.checksum,
        }
        (metrics_dir / "tune.json").write_text(json.dumps(metrics, indent=2))
        board_metrics = leaderboard_numbers(board)
        (metrics_dir / "leaderboard.json").write_text(json.dumps(board_metrics, indent=2))
        (models / "best.json").write_text(json.dumps(chosen, indent=2))
        summary = metrics | chosen
        client.log_metric(parent, "best_val_top1", best.metrics[METRIC])
        client.set_tag(parent, "best_trial", best.trial_id)
        client.set_tag(parent, "best_method", best_method)
        client.set_tag(parent, "selection", chosen["selection"])
        if scores:
            client.log_metric(parent, "best_cv_top1", metrics["best_cv_top1"])
            client.log_dict(parent, pd.DataFrame(scores).to_dict(orient="split"), "finalists.json")
        # the table format of MLflow's log_table, written whole (log_table appends on a rerun)
        client.log_dict(parent, pd.DataFrame([{"method": m, **e} for m, e in board.items()]).to_dict(orient="split"),
                        "leaderboard_val.json")
        for key, value in board_metrics.items():
            client.log_metric(parent, f"leaderboard.{key}", value)
        # The parent's own params are the base params.yaml values; the winner's are logged beside them.
        log_params(client, parent, {f"best.{k}": v for k, v in best.config.items()})
    return summary


def leaderboard(results, rows: list[dict], methods: list[str], p: PipelineConfig, storage: str,
                folder: Path, cv: dict[str, float]) -> dict[str, dict]:
    """Each searched method's trials, completed trials and best trial (the same rule as the overall pick:
    the highest ``cv`` score among its re-validated finalists when it has any, else :func:`select_best` on
    its own trials), whose inference checkpoint goes to ``folder/<method>.pt``
    for the register stage to test. A method with no completed trial (ASHA stopped all of them, or they failed)
    is listed with ``best_val_top1`` None: a score from fewer epochs would not be comparable with the others'."""
    folder.mkdir(parents=True, exist_ok=True)
    board = {}
    for method in methods:
        mine = [(r, row) for r, row in zip(results, rows, strict=True) if row["method"] == method]
        entry = {"trials": len(mine), "completed": sum(row["status"] == "completed" for _, row in mine),
                 "stopped_early": sum(row["status"] == "stopped" for _, row in mine),
                 "best_val_top1": None, "best_trial": None}
        if entry["completed"]:
            order = ranked([r for r, _ in mine], p.train.epochs, storage_filesystem(storage))
            checked = [b for b in order if b.trial_id in cv]  # in validation order: ties go to the earlier one
            best = max(checked, key=lambda b: cv[b.trial_id]) if checked else order[0]
            with tempfile.TemporaryDirectory() as tmp:
                save_inference_checkpoint(read_checkpoint(best.checkpoint, Path(tmp) / "last.pt"), folder / f"{method}.pt")
            entry |= {"best_val_top1": best.metrics[METRIC], "best_trial": best.trial_id,
                      **({"best_cv_top1": cv[best.trial_id]} if checked else {})}
        board[method] = entry
    return board


def leaderboard_numbers(board: dict[str, dict]) -> dict[str, float]:
    """The leaderboard as flat numbers (a DVC metrics file, MLflow metrics): per method its best validation
    top-1 and trial counts, and DR-Tune's lift over the best other method when both ran (negative when it lost)."""
    out = {}
    for method, e in board.items():
        out |= {f"{method}.trials": e["trials"], f"{method}.completed": e["completed"],
                f"{method}.stopped_early": e["stopped_early"]}
        if e["best_val_top1"] is not None:
            out[f"{method}.best_val_top1"] = e["best_val_top1"]
    others = [e["best_val_top1"] for m, e in board.items() if m != "drtune" and e["best_val_top1"] is not None]
    if "drtune" in board and others and board["drtune"]["best_val_top1"] is not None:
        out["drtune_val_lift_over_best_other"] = board["drtune"]["best_val_top1"] - max(others)
    return out


def main(argv: list[str] | None = None) -> int:
    return stage_main("tune", __doc__, argv,
                      lambda path, sets, fresh=False: run(load(path, sets), fresh=fresh or os.environ.get("DRTUNE_FRESH") == "1"),
                      lambda s: json.dumps({k: s[k] for k in ("best_trial", "best_val_top1", "completed", "stopped_early",
                                                              "failed", "wall_s")}),
                      flags={"--fresh": "discard a stored search of the same settings and start it again"})


if __name__ == "__main__":
    sys.exit(main())
