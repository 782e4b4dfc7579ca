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

What Optuna sees (the space, PRUNED for ASHA-stopped trials, FAIL for errors, a retried trial's
result) is :mod:`pipeline.searcher`'s. The final pick is :mod:`pipeline.selection`'s, among
trials that ran every epoch (:func:`trial_candidates`): a stopped trial's score is from a shorter,
un-annealed schedule and its checkpoint is not a finished model.

Early stopping is :mod:`pipeline.early_stopping`'s (across methods, each method has its own rungs); a
stored search is checked, restored or discarded by :mod:`pipeline.experiment_state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
import pyarrow.fs
from ray import tune
from ray.train import Checkpoint

from drtune import methods
from pipeline import compat
from pipeline.cluster import join_uri, trial_resources
from pipeline.config import PipelineConfig
from pipeline.early_stopping import replay_rungs, scheduler
from pipeline.experiment_state import restore_tuner
from pipeline.searcher import MethodSpace, PruningOptunaSearch, search_space
from pipeline.selection import Candidate, Outcomes
from pipeline.space import define_by_run, starting_points, trial_config
from pipeline.training import ReportToTune, SharedData, run_training


def trial_driver(sampled: dict, *, base: PipelineConfig, data: SharedData, storage: str, specs: list) -> None:
    """A Tune trial: run this trial's config as a Ray Train job; metrics flow to Tune. ``specs`` are the
    searched methods' specs, carried by value (a method registered only in the driver trains here too)."""
    methods.adopt(specs)
    run_training(
        trial_config(base, sampled),
        base,
        data,
        storage,
        tune.get_context().get_trial_id(),
        [ReportToTune(base.train.epochs)],
    )


def _tuner(
    config: PipelineConfig,
    driver_fn,
    storage: str,
    name: str,
    callbacks: list,
    param_space: dict,
    stop: tune.Stopper | None = None,
    **tune_config,
) -> tune.Tuner:
    """The Tuner stored at ``storage/name`` restored (finished trials kept, unfinished resumed, errored
    retried, each from its last checkpoint), else a new one: ``driver_fn`` with a trial driver's
    resources, at most as many trials at once as the cluster fits, no Tune-level retries; ``stop``
    (the time budget) replaces a restored search's stopper."""
    driver, concurrency = trial_resources(config)
    trainable = tune.with_resources(driver_fn, driver)
    if "search_alg" in tune_config and concurrency:  # the searcher limits itself (see PruningOptunaSearch)
        tune_config["search_alg"].set_max_concurrency(concurrency)
        concurrency = None
    restored = restore_tuner(join_uri(storage, name), trainable)
    if restored is not None:
        replay_rungs(compat.tuner_scheduler(restored), restored.get_results(), config.tune_metric())
        if stop is not None:
            compat.set_tuner_stopper(restored, stop)
        return restored
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, **tune_config),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=callbacks,
            stop=stop,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def build_tuner(
    config: PipelineConfig,
    data: SharedData,
    storage: str,
    name: str,
    callbacks: list,
    budget: tune.Stopper | None = None,
) -> tune.Tuner:
    """The search's Tuner (:func:`_tuner`: restored when stored), stopped by ``budget`` when given. A trial that
    failed because a file or a disk was bad succeeds on the rerun once that is fixed; a diverged trial is not an
    error and stays failed."""
    t = config.tune
    # group=True: TPE models each method's (and backbone's) conditional subspace on the trials that drew it.
    sampler = optuna.samplers.TPESampler(
        seed=t.seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=t.startup_trials,
        group=define_by_run(config),
    )
    metric = config.tune_metric()
    space = {"space": MethodSpace(config), "metric": metric, "mode": "max"} if define_by_run(config) else {}
    searcher = PruningOptunaSearch(
        points_to_evaluate=starting_points(config) or None, sampler=sampler, max_epochs=config.train.epochs, **space
    )
    return _tuner(
        config,
        tune.with_parameters(
            trial_driver,
            base=config,
            data=data,
            storage=join_uri(storage, "train"),
            specs=[methods.get(m) for m in config.search_methods()],
        ),
        storage,
        name,
        callbacks,
        search_space(config),
        stop=budget,
        metric=metric,
        mode="max",
        search_alg=searcher,
        scheduler=scheduler(config),
        num_samples=t.num_samples or -1,  # -1: until the time budget stops the search
    )


def require_finished(results, expected: int | None, message: str, epochs: int | None = None) -> None:
    """Raise KeyboardInterrupt(``message``) unless all ``expected`` trials ended (done or errored):
    a Tuner stopped by Ctrl-C saves its state and *returns*, and its partial results must never
    be taken for a finished search. A trial the interrupt cut short is neither: Tune counts it in
    ``num_terminated`` (every trial without an error), but its last result is not marked ``done``.
    A trial whose last result reached ``epochs`` finished its schedule, ``done`` or not: Tune marks a
    trial that returned ``done`` only in memory, so a search state saved just before that (and
    restored by the next run) lacks the mark. ``expected`` None (no trial count, a time budget): every
    trial Tune started must have ended."""

    def ended(r) -> bool:
        m = r.metrics or {}
        last = bool(m.get("diverged")) or (epochs is not None and m.get("epoch", 0) >= epochs)  # no more to run
        return r.error is not None or bool(m.get("done")) or last

    if sum(map(ended, results)) < (len(results) if expected is None else expected):
        raise KeyboardInterrupt(message)


def trial_candidates(
    results,
    max_epochs: int,
    n_val: int,
    method: str,
    metric: str = "top1",
    filesystem: pyarrow.fs.FileSystem | None = None,
    backbone: str = "",
    ended: set[str] | None = None,
) -> list[Candidate]:
    """Every trial of a search as a :class:`~pipeline.selection.Candidate`, in Tune's order: completed
    (every epoch, a finite score), stopped (by ASHA), cut (by the time budget: ``ended`` is given, the trials
    that ended on their own, and it is not among them) or failed (an error or a divergence). ``method`` and
    ``backbone`` are what a trial without a sampled method or backbone trained; ``metric`` is ``tune.metric``,
    the score read from each trial's last validation; ``ref`` is its last checkpoint.

    ``filesystem`` is the storage's (:func:`pipeline.cluster.storage_filesystem`): the checkpoint
    path Tune reports is relative to it."""
    out = []
    for r, (trial_id, config) in zip(results, compat.trials_of(results), strict=True):
        m = r.metrics or {}
        score = float(m.get(f"val_{metric}", math.nan))
        # no score without an epoch: a trial stopped before its first one (the budget, an interrupt) did not fail
        failed = r.error is not None or bool(m.get("diverged")) or ("epoch" in m and not math.isfinite(score))
        status = "failed" if failed else ("completed" if m.get("epoch", 0) >= max_epochs else "stopped")
        if status == "stopped" and ended is not None and trial_id not in ended:
            status = "cut"
        out.append(
            Candidate(
                id=trial_id,
                method=config.get("method", method),
                val_score=score,
                val_loss=float(m.get("val_loss", math.nan)),
                n_val=n_val,
                status=status,
                metric=metric,
                backbone=config.get("backbone", backbone),
                config=config,
                ref=Checkpoint(m["checkpoint_path"], filesystem=filesystem) if status == "completed" else None,
            )
        )
    return out


def finalist_driver(
    point: dict, *, base: PipelineConfig, finalists: list[dict], data: SharedData, storage: str, specs: list
) -> None:
    """A re-validation trial: finalist ``point["finalist"]`` (its sampled values) trained on extra fold ``point["fold"]``."""
    methods.adopt(specs)
    run_training(
        trial_config(base, finalists[point["finalist"]]),
        base,
        data,
        storage,
        tune.get_context().get_trial_id(),
        [ReportToTune(base.train.epochs)],
        fold=point["fold"],
    )


def build_finalist_tuner(
    config: PipelineConfig,
    data: SharedData,
    storage: str,
    name: str,
    finalists: list[Candidate],
    callbacks: list,
    budget: tune.Stopper | None = None,
) -> tune.Tuner:
    """Every finalist on every one of ``tune.finalist_folds`` extra folds (:mod:`drtune.folds`), all epochs, no
    early stopping and no sampler: a grid, stopped by ``budget`` (what is left of the search's time budget).
    Restored, like :func:`build_tuner`'s search, when it is stored."""
    driver_fn = tune.with_parameters(
        finalist_driver,
        base=config,
        finalists=[c.config for c in finalists],
        data=data,
        storage=join_uri(storage, "train"),
        specs=[methods.get(m) for m in config.search_methods()],
    )
    space = {
        "finalist": tune.grid_search(list(range(len(finalists)))),
        "fold": tune.grid_search(list(range(1, config.tune.finalist_folds + 1))),
    }
    return _tuner(config, driver_fn, storage, name, callbacks, space, stop=budget)


def cross_validated(
    finalists: list[Candidate],
    refits,
    max_epochs: int,
    metric: str = "top1",
    outcomes: Callable[[int, object | None], Outcomes] | None = None,
) -> list[Candidate]:
    """The finalists with their extra folds pooled in (:meth:`Candidate.revalidated`): ``cv_score`` is the mean
    validation ``metric`` over their own split and every extra fold (for top-1 the folds are the same size, so
    it is their accuracy over all of those images). ``outcomes(fold, refit)``, when given, scores a finished
    refit's model image by image on its fold (``refit`` None: it diverged, every image wrong), so the finalists
    can be compared paired on all of those images.

    A finalist that diverges on a fold scores 0 there (every image wrong): a setting that trains only on some
    splits is fragile. A refit that failed or did not finish is an error: its fold would be missing from the mean."""
    folds: dict[int, dict[int, float]] = {i: {} for i in range(len(finalists))}
    per_image: dict[int, dict[int, Outcomes]] = {i: {} for i in range(len(finalists))}
    for r, (_, point) in zip(refits, compat.trials_of(refits), strict=True):  # point: even without a report
        m = r.metrics or {}
        i, fold = point["finalist"], point["fold"]
        if r.error is not None or not (m.get("diverged") or m.get("epoch", 0) >= max_epochs):
            raise RuntimeError(
                f"finalist {finalists[i].id} on extra fold {fold} "
                "did not finish; run the stage again: it continues from its last checkpoint"
            )
        folds[i][fold] = 0.0 if m.get("diverged") else float(m[f"val_{metric}"])
        if outcomes is not None:
            per_image[i][fold] = outcomes(fold, None if m.get("diverged") else r)
    return [
        c.revalidated(
            [folds[i][f] for f in sorted(folds[i])],
            [per_image[i][f] for f in sorted(per_image[i])] if outcomes is not None else None,
        )
        for i, c in enumerate(finalists)
    ]
