"""The hyperparameter search: Ray Tune with Optuna's TPE and ASHA, each trial a Ray Train run.

Shape of one search (the Train V2 pattern; ``Tuner(TorchTrainer(...))`` is gone in Ray 2.60):

    Tuner ── trial driver (a function trainable, holds almost nothing)
               └── TorchTrainer.fit() ── ``workers_per_trial`` workers, each running
                                         pipeline.training.train_loop_per_worker (gloo or nccl)

What a trial searches is :mod:`pipeline.space` (Ray-free): each searched name, the config field it
sets and the ``tune.*`` range it is drawn from; the sampled values become a trial's
:class:`~drtune.config.Config` in :func:`~pipeline.space.trial_config`, and that object is what the
workers train. This module turns that space into Ray Tune and Optuna distributions.

Workers report validation metrics and a checkpoint every epoch; ``ReportToTune`` forwards
rank 0's report to Tune, where ASHA (time unit: epochs) may stop the trial and the Optuna searcher
records the value as an intermediate result.

How early stopping and the sampler fit together: Ray's OptunaSearch would tell Optuna that an
ASHA-stopped trial COMPLETED with its low, early-epoch score, as if that were its final result.
:class:`PruningOptunaSearch` tells such trials as PRUNED instead; TPE then ranks them by how far
they got and their last intermediate value, the way Optuna's own pruners work. Failed trials are
told as FAIL and are never sampled around. The final pick (:func:`select_best`) considers only
trials that ran every epoch and takes the highest final-epoch validation top-1 (ties: lower
validation loss): a stopped trial's score is from a shorter, un-annealed schedule and its
checkpoint is not a finished model.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass

import optuna
import pyarrow.fs
from ray import tune
from ray.train import Checkpoint
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from pipeline.cluster import filesystem_and_path, trial_resources
from pipeline.config import PipelineConfig
from pipeline.space import across_methods, ranges, starting_points, trial_config
from pipeline.training import ReportToTune, SharedData, run_training

METRIC = "val_top1"


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells ASHA-stopped trials as PRUNED and errored trials as FAIL."""

    def __init__(self, *args, max_epochs: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or result is None or not math.isfinite(result.get(METRIC, float("nan"))):
            return super().on_trial_complete(trial_id, None, error=True)
        if result.get("epoch", 0) < self.max_epochs:
            return super().on_trial_complete(trial_id, None, error=False)  # no value, no error → PRUNED
        return super().on_trial_complete(trial_id, result, error=False)


def search_space(config: PipelineConfig) -> dict:
    """Ray Tune distributions of :func:`~pipeline.space.ranges`; empty when the search spans methods, whose
    space is Optuna's define-by-run :class:`MethodSpace` instead."""
    if across_methods(config):
        return {}
    return {name: tune.choice(drawn) if isinstance(drawn, list) else tune.loguniform(*drawn)
            for name, drawn in ranges(config).items()}


class MethodSpace:
    """Optuna define-by-run space across ``tune.methods``: first the method, then its own names only,
    each called ``<method>.<name>`` so TPE models every method apart (a linear-probe trial never draws λ).
    Plain data and a ``__call__``, so the searcher's saved state pickles it."""

    def __init__(self, config: PipelineConfig) -> None:
        self.methods = config.search_methods()
        self.draws = {m: [(f"{m}.{name}", drawn) for name, drawn in ranges(config, m).items()] for m in self.methods}

    def __call__(self, trial: optuna.Trial) -> None:
        method = trial.suggest_categorical("method", self.methods)
        for key, drawn in self.draws[method]:
            if isinstance(drawn, list):
                trial.suggest_categorical(key, drawn)
            else:
                trial.suggest_float(key, *drawn, log=True)


def trial_driver(sampled: dict, *, base: PipelineConfig, data: SharedData, storage: str) -> None:
    """A Tune trial: run this trial's config as a Ray Train job; metrics flow to Tune."""
    run_training(trial_config(base, sampled), base, data, storage, tune.get_context().get_trial_id(),
                 [ReportToTune(base.train.epochs)])


class ExperimentStateError(RuntimeError):
    """The stored search cannot be restored (a half-written state); the message says how to start afresh."""


FRESH_HINT = "start it afresh with `python -m pipeline.tune --fresh` (or `DRTUNE_FRESH=1 dvc repro`)"


def check_experiment_state(path: str) -> None:
    """Raise :class:`ExperimentStateError` naming the file when the search stored at ``path`` is
    half-written: ``tuner.pkl`` and the newest ``experiment_state``, ``search_gen_state`` and
    ``searcher-state`` files must all be present and readable (a disk that filled while Tune saved
    them leaves one empty or cut, and Ray then fails later with a message about search spaces)."""
    fs, base = filesystem_and_path(path)
    names = {info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(base)) if info.is_file}
    states = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    stamp = states[-1][len("experiment_state-"):-len(".json")] if states else None
    required = ["tuner.pkl"] + ([f"experiment_state-{stamp}.json", f"search_gen_state-{stamp}.json",
                                 f"searcher-state-{stamp}.pkl"] if stamp else ["experiment_state-<time>.json"])
    for name in required:
        try:
            with fs.open_input_stream(f"{base}/{name}") as f:
                raw = f.read()
            # experiment_state is JSON; search_gen_state, despite its name, is a pickle, like the others
            json.loads(raw) if name.startswith("experiment_state-") else pickle.loads(raw)
        except Exception as err:  # noqa: BLE001 - any way a file fails to read means the state is unusable
            raise ExperimentStateError(f"the stored search at {path} is damaged: {name} cannot be read "
                                       f"({type(err).__name__}); {FRESH_HINT}") from None


def discard_experiment(path: str) -> bool:
    """Delete the search stored at ``path`` (``--fresh``); True when there was one."""
    fs, base = filesystem_and_path(path)
    if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
        return False
    fs.delete_dir(base)
    return True


def _restored(path: str, trainable) -> tune.Tuner | None:
    """The Tuner stored at ``path`` (finished trials kept, unfinished resumed, errored retried), or None."""
    if not tune.Tuner.can_restore(path):
        return None
    check_experiment_state(path)
    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  restart_errored=False)
    except Exception as err:  # noqa: BLE001 - Ray raises many types for a state it cannot read
        raise ExperimentStateError(f"the stored search at {path} cannot be restored ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}); {FRESH_HINT}") from None


def build_tuner(config: PipelineConfig, data: SharedData, storage: str, name: str, callbacks: list) -> tune.Tuner:
    """A new Tuner, or the stored one restored: finished trials are kept, unfinished ones resumed and
    errored ones retried, each from its last checkpoint (a trial that failed because a file or a
    disk was bad then succeeds once that is fixed; a diverged trial is not an error and stays failed)."""
    driver, concurrency = trial_resources(config)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=config, data=data, storage=f"{storage}/train"), driver)
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=0))
    restored = _restored(f"{storage}/{name}", trainable)
    if restored is not None:
        return restored
    t = config.tune
    # group=True: TPE models each method's conditional subspace on the trials that drew it.
    sampler = optuna.samplers.TPESampler(seed=t.seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=t.startup_trials, group=across_methods(config))
    space = {"space": MethodSpace(config), "metric": METRIC, "mode": "max"} if across_methods(config) else {}
    searcher = PruningOptunaSearch(points_to_evaluate=starting_points(config) or None, sampler=sampler,
                                   max_epochs=config.train.epochs, **space)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=config.train.epochs, grace_period=t.grace_period,
                               reduction_factor=t.reduction_factor)
                 if t.early_stopping else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=concurrency),
        run_config=run_config,
    )


@dataclass
class Best:
    """The trial the search picked."""

    trial_id: str
    config: dict
    metrics: dict
    checkpoint: Checkpoint


def require_finished(results, expected: int, message: str) -> None:
    """Raise KeyboardInterrupt(``message``) unless all ``expected`` trials ended (done or errored):
    a Tuner stopped by Ctrl-C saves its state and *returns*, and its partial results must never
    be taken for a finished search."""
    if results.num_terminated + results.num_errors < expected:
        raise KeyboardInterrupt(message)


def ranked(results, max_epochs: int, filesystem: pyarrow.fs.FileSystem | None = None) -> list[Best]:
    """Trials that ran every epoch, best first: highest final-epoch validation top-1, ties by lower
    validation loss, then Tune's order.

    ``filesystem`` is the storage's (:func:`pipeline.cluster.storage_filesystem`): the checkpoint
    path Tune reports is relative to it."""
    finished = [r for r in results if r.error is None and r.metrics and r.metrics.get("epoch", 0) >= max_epochs
                and math.isfinite(r.metrics.get(METRIC, float("nan")))]
    order = sorted(finished, key=lambda r: (-r.metrics[METRIC], r.metrics.get("val_loss", 0.0)))
    return [Best(trial_id=r.metrics["trial_id"], config=dict(r.config), metrics=dict(r.metrics),
                 checkpoint=Checkpoint(r.metrics["checkpoint_path"], filesystem=filesystem)) for r in order]


def select_best(results, max_epochs: int, filesystem: pyarrow.fs.FileSystem | None = None) -> Best:
    """The first of :func:`ranked`: the pick on the validation split alone."""
    finished = ranked(results, max_epochs, filesystem)
    if not finished:
        raise RuntimeError(f"no trial completed all {max_epochs} epochs: {len(results)} trials, "
                           f"{sum(r.error is not None for r in results)} failed (their errors are in their MLflow runs); "
                           "fix the cause and run the stage again: failed trials are retried from their last checkpoints")
    return finished[0]


def finalist_driver(point: dict, *, base: PipelineConfig, finalists: list[dict], data: SharedData, storage: str) -> None:
    """A re-validation trial: finalist ``point["finalist"]`` (its sampled values) trained on extra fold ``point["fold"]``."""
    run_training(trial_config(base, finalists[point["finalist"]]), base, data, storage, tune.get_context().get_trial_id(),
                 [ReportToTune(base.train.epochs)], fold=point["fold"])


def build_finalist_tuner(config: PipelineConfig, data: SharedData, storage: str, name: str, finalists: list[Best],
                         callbacks: list) -> tune.Tuner:
    """Every finalist on every one of ``tune.finalist_folds`` extra folds (:mod:`drtune.folds`), all epochs, no
    early stopping and no sampler: a grid. Restored, like :func:`build_tuner`'s search, when it is stored."""
    driver, concurrency = trial_resources(config)
    trainable = tune.with_resources(tune.with_parameters(
        finalist_driver, base=config, finalists=[b.config for b in finalists], data=data, storage=f"{storage}/train"),
        driver)
    restored = _restored(f"{storage}/{name}", trainable)
    if restored is not None:
        return restored
    space = {"finalist": tune.grid_search(list(range(len(finalists)))),
             "fold": tune.grid_search(list(range(1, config.tune.finalist_folds + 1)))}
    return tune.Tuner(trainable, param_space=space,
                      tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
                      run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1,
                                                failure_config=tune.FailureConfig(max_failures=0)))


def cross_validated(finalists: list[Best], refits, max_epochs: int) -> list[dict]:
    """Each finalist's validation top-1 on its own split and on every extra fold, and their mean ``cv_top1``
    (the folds are the same size, so the mean is its accuracy over all of their images).

    A finalist that diverges on a fold scores 0 there: a setting that trains only on some splits is fragile.
    A refit that failed or did not finish is an error: its fold would be missing from the mean."""
    folds = {i: {} for i in range(len(finalists))}
    for r in refits:
        m = r.metrics or {}
        if r.error is not None or not (m.get("diverged") or m.get("epoch", 0) >= max_epochs):
            raise RuntimeError(f"finalist {finalists[r.config['finalist']].trial_id} on extra fold {r.config['fold']} "
                               "did not finish; run the stage again: it continues from its last checkpoint")
        folds[r.config["finalist"]][r.config["fold"]] = 0.0 if m.get("diverged") else float(m[METRIC])
    out = []
    for i, b in enumerate(finalists):
        scores = [float(b.metrics[METRIC])] + [folds[i][f] for f in sorted(folds[i])]
        out.append({"trial": b.trial_id, "val_top1": scores[0], "fold_top1": scores[1:], "cv_top1": sum(scores) / len(scores)})
    return out


def cross_validated_pick(finalists: list[Best], scores: list[dict]) -> Best:
    """The finalist with the highest ``cv_top1``; ties go to the earlier finalist (the validation split's order)."""
    return finalists[max(range(len(finalists)), key=lambda i: (scores[i]["cv_top1"], -i))]
