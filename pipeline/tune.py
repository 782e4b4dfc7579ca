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
chosen model is the candidate's own (the search trial's, or the baseline's), or with ``tune.soup`` its
average with other completed candidates (:mod:`pipeline.soups`).
Outputs:

* ``models/best.safetensors`` — the chosen model: encoder + head, params, classes, history (its last epoch:
  see :mod:`drtune.evaluation`);
* ``models/leaderboard/<method>.safetensors`` — each method's best model (CE's may be the baseline), tested by ``register``;
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
import sys
import time
from pathlib import Path

from ray import tune

from drtune.config import ConfigError
from drtune.folds import max_extra_folds
from drtune.preflight import preflight
from drtune.prepared import load_prepared
from pipeline.choosing import baseline_candidate, choose, near_the_top, revalidation
from pipeline.cluster import join_uri, local_storage, start_ray, storage_filesystem, storage_uri
from pipeline.config import PipelineConfig, redact
from pipeline.experiment_state import FRESH_HINT, discard_experiment, search_lock
from pipeline.mlflow_connect import connect, tracking_errors
from pipeline.mlflow_store import (
    dataset_inputs,
    discard_parent,
    experiment_id,
    git_commit,
    log_params,
    parent_run,
    run_outcome,
)
from pipeline.placement_watch import PlacementGroupWatch
from pipeline.pretrained import backbone_files, start_weights
from pipeline.progress import Progress
from pipeline.search import build_tuner, require_finished, trial_candidates
from pipeline.selection import rank
from pipeline.soups import make_soup
from pipeline.space import checked_starting_points, largest_runs
from pipeline.stage import flat, stage_main
from pipeline.time_budget import TimeBudget, TrialEnds
from pipeline.training import run_name, share_data
from pipeline.trial_runs import TrialRuns
from pipeline.tune_outputs import LAST, log_pick, staged, write_outputs


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path("."), fresh: bool = False) -> dict:
    """Run (or resume) the search and write the stage's outputs under ``root``; ``fresh`` first discards
    a stored search of the same settings (its Ray experiment, and its MLflow parent is detached)."""
    data = load_prepared(root / p.data.prepared_dir)
    p = p.with_steps_resolved(len(data.train))  # train.steps → train.epochs, now that the split's size is known
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    checked_starting_points(p)  # tune.points_to_evaluate, and room for them in tune.num_samples, before Ray starts
    folds = max_extra_folds(data.train, data.val)
    if p.tune.revalidate != "never" and p.tune.finalist_folds > folds:
        raise ConfigError(
            f"tune.finalist_folds = {p.tune.finalist_folds}: the prepared training split holds {folds} "
            "disjoint folds the size of the validation split (per class); lower it"
        )
    backbone = start_weights(p, root)  # the pretrain stage's backbone, or None: model.pretrained as configured
    baseline = baseline_candidate(root, p, data.checksum, len(data.val), backbone.sha256, p.default_backbone())
    # Everything a worker would reject, before Ray starts, for every backbone; each trial keeps one checkpoint.
    for field, largest in largest_runs(p):
        preflight(
            largest,
            local_storage(p, root),
            field="ray.storage_path",
            checkpoints=(p.tune.num_samples or p.tune.startup_trials) + p.tune.finalists * p.tune.finalist_folds + 1,
            model_field=field,
        )
    weight_files, weights_digest = backbone_files(p, backbone, root)  # read once checked, for the workers
    start_ray(p)
    storage = storage_uri(p, root)
    ray_run = run_name("search", p, data.checksum + weights_digest)  # the Ray Tune experiment (a folder under storage)
    experiment_path = join_uri(storage, ray_run)
    shown = redact(experiment_path)  # what is printed, tagged and written: never the storage's credentials
    with search_lock(storage, ray_run):  # one run of a stored search at a time
        mlflow_experiment = experiment_id(client, p.mlflow_experiment())
        if fresh:
            discard_parent(client, mlflow_experiment, shown)
            if discard_experiment(join_uri(storage, f"{ray_run}-finalists")) | discard_experiment(experiment_path):
                print(f"starting afresh: deleted the search stored at {shown}", flush=True)
        elif tune.Tuner.can_restore(experiment_path):
            print(
                f"resuming the search stored at {shown}: finished trials are kept, unfinished and failed ones "
                f"continue from their last checkpoints; to {FRESH_HINT}",
                flush=True,
            )
        parent = parent_run(
            client,
            mlflow_experiment,
            shown,
            run_name=ray_run,
            tags={
                "git_commit": git_commit(root),
                "data_sha256": data.checksum,
                "ray_experiment_path": shown,
                "dataset": p.data.dataset,
                "method": p.train.method,
            },
        )
        with run_outcome(client, parent):  # FINISHED, KILLED or FAILED: never left RUNNING
            log_params(client, parent, flat(p.model_dump(mode="json", exclude={"mlflow": True})))
            inputs = dataset_inputs(data, p.data.prepared_dir)
            client.log_inputs(parent, datasets=inputs)
            trial_runs = TrialRuns(client, mlflow_experiment, parent, p.train.epochs, inputs, base=p)
            progress = Progress(p.train.epochs, p.tune.metric)
            shared = share_data(data, weight_files)
            watch = PlacementGroupWatch()  # removes a trial's leaked worker reservation (see its module)
            budget = None
            if p.tune.time_budget_s is not None:  # counted across resumes (pipeline/time_budget.py)
                budget = TimeBudget.resumed(p.tune.time_budget_s, experiment_path)
                print(
                    f"time budget: {p.tune.time_budget_s:g} s, {budget.spent_before:.0f} s spent before this run",
                    flush=True,
                )
            trial_runs.budget = budget
            ends = [TrialEnds(budget)] if budget is not None else []
            tuner = build_tuner(p, shared, storage, ray_run, [trial_runs, progress, watch, *ends], budget)
            start = time.time()
            try:
                results = tuner.fit()
            finally:
                trial_runs.close_open_runs()
                if budget is not None:
                    spent = budget.store(experiment_path)  # what a resume reads is what best.json says
            out_of_time = budget is not None and budget.fired  # the budget stopped it, not a Ctrl-C near its end
            if not out_of_time:  # the budget's end is the search's end; anything else that stops it is an interrupt
                require_finished(
                    results, p.tune.num_samples, f"search interrupted; its state is stored at {shown}", p.train.epochs
                )
            budget_record = (
                {
                    "time_budget_s": p.tune.time_budget_s,
                    "search_s": round(spent, 1),
                    "budget_exhausted": out_of_time,
                    "trials_run": len(results),
                }
                if budget is not None
                else {}
            )
            candidates = trial_candidates(
                results,
                p.train.epochs,
                len(data.val),
                p.train.method,
                p.tune.metric,
                storage_filesystem(storage),
                p.default_backbone(),
                ended=budget.ended if out_of_time else None,  # the others were cut by the budget
            )
            # every trial's MLflow run as Tune has it, whatever an outage or restore missed
            trial_runs.reconcile(results, cut={c.id for c in candidates if c.status == "cut"})
            errored = [c.id for c, r in zip(candidates, results, strict=True) if r.error is not None]
            if errored and not p.tune.allow_partial:
                raise RuntimeError(
                    f"{len(errored)} of {len(results)} trials failed with an error ({', '.join(errored)}; the errors are in "
                    "their MLflow runs), so the search is partial and nothing is written: run the stage again (dvc repro) "
                    "to retry them from their last checkpoints, or set tune.allow_partial: true to pick among the others"
                )
            candidates += [baseline] if baseline else []
            if not rank(candidates) and out_of_time:
                raise RuntimeError(
                    f"the time budget (tune.time_budget_s = {p.tune.time_budget_s:g} s) ran out before any of the "
                    f"{len(results)} trials completed all {p.train.epochs} epochs, so there is nothing to pick and "
                    "nothing is written: raise tune.time_budget_s (a new search) or lower train.epochs"
                )
            if not rank(candidates):
                raise RuntimeError(
                    f"no trial completed all {p.train.epochs} epochs: {len(results)} trials, "
                    f"{sum(c.status == 'failed' for c in candidates)} failed (their errors are in their MLflow "
                    "runs); fix the cause and run the stage again: failed trials are retried from their last "
                    "checkpoints"
                )
            candidates = near_the_top(candidates, data.val, len(data.classes))
            try:  # re-validation spends what is left of the time budget
                revalidate = revalidation(p, data, shared, storage, ray_run, [progress, watch], budget)
                chosen, scored = choose(p, candidates, revalidate)
            finally:
                if budget is not None:
                    spent = budget.store(experiment_path)
            if budget is not None:
                budget_record |= {"search_and_revalidation_s": round(spent, 1), "revalidated": len(scored)}
            for c in scored:
                if c.baseline:
                    client.log_metric(
                        json.loads((root / "models" / "baseline.json").read_text())["mlflow_run_id"],
                        f"cv_{p.tune.metric}",
                        c.cv_score,
                    )
                else:
                    trial_runs.log_final(c.id, {f"cv_{p.tune.metric}": c.cv_score})
            trial_runs.flush()
            print(f"pick: {chosen.chosen.id} ({chosen.chosen.method}), rule {chosen.rule}: {chosen.reason}", flush=True)
            landscape = [
                {
                    "status": c.status,
                    "epochs": p.train.epochs if c.status == "completed" else int((r.metrics or {}).get("epoch", 0)),
                }
                for c, r in zip(candidates[: len(results)], results, strict=True)
            ]  # the baseline is no trial
            soup = make_soup(p, chosen, data.val)
            if soup[1] is not None:
                s = soup[1]
                print(
                    f"soup ({s['recipe']}): {' + '.join(s['ingredients'])}, validation {p.tune.metric} "
                    f"{s[f'val_{p.tune.metric}']:.4f} against the pick's {s[f'pick_val_{p.tune.metric}']:.4f}",
                    flush=True,
                )
            with staged(root) as scratch:  # moved into place only once every file is written
                metrics, record = write_outputs(
                    p, scratch, candidates, landscape, chosen, scored, time.time() - start, budget_record, soup
                )
                record |= {
                    "experiment_path": shown,
                    "mlflow_parent_run_id": parent,
                    "mlflow_experiment_id": mlflow_experiment,
                    "data_sha256": data.checksum,
                }
                (scratch / LAST).write_text(json.dumps(record, indent=2))
            log_pick(client, parent, chosen, record)
            if out_of_time:
                print(
                    f"time budget spent: {len(results)} trials ran; the pick is among the "
                    f"{metrics['completed']} that completed all {p.train.epochs} epochs",
                    flush=True,
                )
        return metrics | record


def main(argv: list[str] | None = None) -> int:
    def summary(s: dict) -> str:
        return json.dumps(
            {
                k: s[k]
                for k in ("best_trial", f"best_val_{s['metric']}", "completed", "stopped_early", "failed", "wall_s")
            }
        )

    def search(p: PipelineConfig, fresh: bool = False) -> dict:
        return run(p, fresh=fresh or os.environ.get("DRTUNE_FRESH") == "1")

    flags = {"--fresh": "discard a stored search of the same settings and start it again"}
    return stage_main("tune", __doc__, argv, search, summary, flags=flags)


if __name__ == "__main__":
    sys.exit(main())
