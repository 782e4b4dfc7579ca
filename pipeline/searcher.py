"""What Optuna sees of the search: the space, and how each trial's end is told to it.

Ray's OptunaSearch would tell Optuna that an ASHA-stopped trial COMPLETED with its low, early-epoch
score, as if that were its final result. :class:`PruningOptunaSearch` tells such trials as PRUNED
instead; TPE then ranks them by how far they got and their last intermediate value, the way
Optuna's own pruners work. Failed trials are told as FAIL and never sampled around, until a rerun
retries one and it finishes: then its result is recorded too. Across methods the space is
define-by-run (:class:`MethodSpace`), and so is it across backbones: the backbone, the method, then the
method's own hyperparameters.
"""

from __future__ import annotations

import math

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from pipeline.config import PipelineConfig
from pipeline.space import define_by_run, ranges


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
        if error or result is None or not math.isfinite(result.get(self._metric, float("nan"))):
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
                    value=None if result is None else result[self._metric],
                    state=optuna.trial.TrialState.PRUNED if result is None else optuna.trial.TrialState.COMPLETE,
                )
            )
        return None


def search_space(config: PipelineConfig) -> dict:
    """Ray Tune distributions of :func:`~pipeline.space.ranges`; empty when the search spans methods or
    backbones, whose space is Optuna's define-by-run :class:`MethodSpace` instead."""
    if define_by_run(config):
        return {}
    return {
        name: tune.choice(drawn) if isinstance(drawn, list) else tune.loguniform(*drawn)
        for name, drawn in ranges(config).items()
    }


class MethodSpace:
    """Optuna define-by-run space across ``tune.models`` and ``tune.methods``: first the backbone (when
    ``tune.models`` lists them), then the method, then its own names only, each called ``<method>.<name>``
    so TPE models every method apart (a linear-probe trial never draws λ). Plain data and a ``__call__``,
    so the searcher's saved state pickles it."""

    def __init__(self, config: PipelineConfig) -> None:
        self.backbones = [str(c.label) for c in config.tune.models or []]
        self.methods = config.search_methods()
        self.draws = {m: [(f"{m}.{name}", drawn) for name, drawn in ranges(config, m).items()] for m in self.methods}

    def __call__(self, trial: optuna.Trial) -> None:
        if self.backbones:
            trial.suggest_categorical("backbone", self.backbones)
        method = trial.suggest_categorical("method", self.methods)
        for key, drawn in self.draws[method]:
            if isinstance(drawn, list):
                trial.suggest_categorical(key, drawn)
            else:
                trial.suggest_float(key, *drawn, log=True)
