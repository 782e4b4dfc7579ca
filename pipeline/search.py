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
told as FAIL and are never sampled around. The final pick is :mod:`pipeline.selection`'s, among
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
from ray.tune.search.optuna import OptunaSearch

from drtune import methods
from pipeline import compat
from pipeline.cluster import join_uri, trial_resources
from pipeline.config import PipelineConfig
from pipeline.early_stopping import replay_rungs, scheduler
from pipeline.experiment_state import restore_tuner
from pipeline.selection import Candidate
from pipeline.space import across_methods, ranges, starting_points, trial_config
from pipeline.training import ReportToTune, SharedData, run_training

METRIC = "val_top1"


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells ASHA-stopped trials as PRUNED and errored trials as FAIL, learns from a
    failed trial that a rerun retried, and limits the trials at once itself.

    A trial that failed is told FAIL; when a rerun retries it and it then finishes, Ray hands the
    searcher its completion again, which both Ray's ``ConcurrencyLimiter`` (the trial is no longer
    live) and ``OptunaSearch`` (it was told) drop. Here that completion becomes a new COMPLETE (or
    PRUNED) record of the same parameters in the study, so the trials sampled after it learn from it;
    and the searcher counts its own live trials (:meth:`set_max_concurrency`) instead of sitting
    behind a ``ConcurrencyLimiter``."""

    def __init__(self, *args, max_epochs: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self.max_concurrent = 0
        self.live: set[str] = set()

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None  # Tune asks again when a trial ends
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            self.live.add(trial_id)
        return config

    def _state(self, result: dict | None, error: bool) -> tuple[dict | None, bool]:
        """(the result to tell, error): FAIL for an error or no finite score, PRUNED (no result, no error)
        for a trial ASHA stopped before the last epoch, else COMPLETE with its score."""
        if error or result is None or not math.isfinite(result.get(METRIC, float("nan"))):
            return None, True
        return (None, False) if result.get("epoch", 0) < self.max_epochs else (result, False)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        result, error = self._state(result, error)
        if trial_id not in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error=error)
        if not error:  # a retried trial that was told FAIL has finished: record what it reached
            told = self._ot_trials[trial_id]
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    params=told.params,
                    distributions=told.distributions,
                    value=None if result is None else result[METRIC],
                    state=optuna.trial.TrialState.PRUNED if result is None else optuna.trial.TrialState.COMPLETE,
                )
            )
        return None


def search_space(config: PipelineConfig) -> dict:
    """Ray Tune distributions of :func:`~pipeline.space.ranges`; empty when the search spans methods, whose
    space is Optuna's define-by-run :class:`MethodSpace` instead."""
    if across_methods(config):
        return {}
    return {
        name: tune.choice(drawn) if isinstance(drawn, list) else tune.loguniform(*drawn)
        for name, drawn in ranges(config).items()
    }


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
    config: PipelineConfig, driver_fn, storage: str, name: str, callbacks: list, param_space: dict, **tune_config
) -> tune.Tuner:
    """The Tuner stored at ``storage/name`` restored (finished trials kept, unfinished resumed, errored
    retried, each from its last checkpoint), else a new one: ``driver_fn`` with a trial driver's
    resources, at most as many trials at once as the cluster fits, no Tune-level retries."""
    driver, concurrency = trial_resources(config)
    trainable = tune.with_resources(driver_fn, driver)
    if "search_alg" in tune_config and concurrency:  # the searcher limits itself (see PruningOptunaSearch)
        tune_config["search_alg"].set_max_concurrency(concurrency)
        concurrency = None
    restored = restore_tuner(join_uri(storage, name), trainable)
    if restored is not None:
        replay_rungs(compat.tuner_scheduler(restored), restored.get_results(), METRIC)
        return restored
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, **tune_config),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=callbacks,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def build_tuner(config: PipelineConfig, data: SharedData, storage: str, name: str, callbacks: list) -> tune.Tuner:
    """The search's Tuner (:func:`_tuner`: restored when stored). A trial that failed because a file or a
    disk was bad succeeds on the rerun once that is fixed; a diverged trial is not an error and stays failed."""
    t = config.tune
    # group=True: TPE models each method's conditional subspace on the trials that drew it.
    sampler = optuna.samplers.TPESampler(
        seed=t.seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=t.startup_trials,
        group=across_methods(config),
    )
    space = {"space": MethodSpace(config), "metric": METRIC, "mode": "max"} if across_methods(config) else {}
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
        metric=METRIC,
        mode="max",
        search_alg=searcher,
        scheduler=scheduler(config),
        num_samples=t.num_samples,
    )


def require_finished(results, expected: int, message: str) -> None:
    """Raise KeyboardInterrupt(``message``) unless all ``expected`` trials ended (done or errored):
    a Tuner stopped by Ctrl-C saves its state and *returns*, and its partial results must never
    be taken for a finished search."""
    if results.num_terminated + results.num_errors < expected:
        raise KeyboardInterrupt(message)


def trial_candidates(
    results, max_epochs: int, n_val: int, method: str, filesystem: pyarrow.fs.FileSystem | None = None
) -> list[Candidate]:
    """Every trial of a search as a :class:`~pipeline.selection.Candidate`, in Tune's order: completed
    (every epoch, a finite score), stopped (by ASHA) or failed (an error or a divergence). ``method`` is
    the one a trial without a sampled method trained; ``ref`` is its last checkpoint.

    ``filesystem`` is the storage's (:func:`pipeline.cluster.storage_filesystem`): the checkpoint
    path Tune reports is relative to it."""
    out = []
    for r in results:
        m = r.metrics or {}
        score = float(m.get(METRIC, math.nan))
        failed = r.error is not None or bool(m.get("diverged")) or not math.isfinite(score)
        status = "failed" if failed else ("completed" if m.get("epoch", 0) >= max_epochs else "stopped")
        out.append(
            Candidate(
                id=m.get("trial_id") or str(r.path).rsplit("/", 1)[-1],
                method=r.config.get("method", method),
                val_top1=score,
                val_loss=float(m.get("val_loss", math.nan)),
                n_val=n_val,
                status=status,
                config=dict(r.config),
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
    config: PipelineConfig, data: SharedData, storage: str, name: str, finalists: list[Candidate], callbacks: list
) -> tune.Tuner:
    """Every finalist on every one of ``tune.finalist_folds`` extra folds (:mod:`drtune.folds`), all epochs, no
    early stopping and no sampler: a grid. Restored, like :func:`build_tuner`'s search, when it is stored."""
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
    return _tuner(config, driver_fn, storage, name, callbacks, space)


def cross_validated(
    finalists: list[Candidate], refits, max_epochs: int, right: Callable[[object], tuple[bool, ...]] | None = None
) -> list[Candidate]:
    """The finalists with their extra folds pooled in (:meth:`Candidate.revalidated`): ``cv_top1`` is the mean
    validation top-1 over their own split and every extra fold (the folds are the same size, so it is their
    accuracy over all of those images). ``right(refit)``, when given, scores a finished refit's model image by
    image on its fold, so the finalists can be compared paired on all of those images.

    A finalist that diverges on a fold scores 0 there (every image wrong): a setting that trains only on some
    splits is fragile. A refit that failed or did not finish is an error: its fold would be missing from the mean."""
    folds: dict[int, dict[int, float]] = {i: {} for i in range(len(finalists))}
    rights: dict[int, dict[int, tuple[bool, ...]]] = {i: {} for i in range(len(finalists))}
    for r in refits:
        m = r.metrics or {}
        if r.error is not None or not (m.get("diverged") or m.get("epoch", 0) >= max_epochs):
            raise RuntimeError(
                f"finalist {finalists[r.config['finalist']].id} on extra fold {r.config['fold']} "
                "did not finish; run the stage again: it continues from its last checkpoint"
            )
        i, fold = r.config["finalist"], r.config["fold"]
        folds[i][fold] = 0.0 if m.get("diverged") else float(m[METRIC])
        if right is not None:
            rights[i][fold] = (False,) * finalists[i].n_val if m.get("diverged") else right(r)
    return [
        c.revalidated(
            [folds[i][f] for f in sorted(folds[i])],
            [rights[i][f] for f in sorted(rights[i])] if right is not None else None,
        )
        for i, c in enumerate(finalists)
    ]
