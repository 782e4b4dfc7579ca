"""Early stopping for the search: none, one ASHA over every trial, or :class:`MethodASHA` across methods
or backbones.

ASHA (time unit: epochs) stops a trial whose score at a rung is in the bottom of those that reached it.
Across methods a shared rung would stop a method that starts slowly by its speed, not by where it ends:
:class:`MethodASHA` gives each method (and each backbone's method) its own rungs and runs each
starting point to the end.

Tune never saves a scheduler: a restored search gets the scheduler as it was created, with empty
rungs, and a resumed trial would then run past a rung that had stopped it and record a later
epoch's score there. :func:`replay_rungs` refills the rungs from the stored trials' per-epoch
scores, so a resumed search stops the same trials as an uninterrupted one.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipeline.config import PipelineConfig
from pipeline.space import define_by_run, starting_points


class MethodASHA(FIFOScheduler):
    """ASHA with one set of rungs per method (per backbone and method across ``tune.models``), and each
    starting point run to the end.

    Methods learn at different speeds early on (a regulariser slows the first epochs, a linear probe
    is quick), and so do backbones, so a rung shared across them stops a slow starter by speed, not by
    where it ends. Here a trial is compared only with trials of its own method on its own backbone: each
    has its own :class:`ASHAScheduler`. A trial whose config is one of ``anchors`` (the methods' starting points,
    their ``params.yaml`` values) is never stopped early; its scores still fill its method's rungs,
    so later trials of that method are measured against it.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float, anchors: list[dict]) -> None:
        super().__init__()
        self._asha_args = {
            "time_attr": "epoch",
            "max_t": max_t,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
        }
        self._max_t = max_t
        self._anchors = anchors
        self._rungs: dict[str, ASHAScheduler] = {}
        self._metric = self._mode = None

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _of(self, trial) -> ASHAScheduler:
        arm = "/".join(filter(None, (trial.config.get("backbone"), trial.config.get("method", ""))))
        if arm not in self._rungs:
            self._rungs[arm] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._asha_args)
        return self._rungs[arm]

    def is_anchor(self, config: dict) -> bool:
        """Whether ``config`` is one of the starting points (the sampler returns them as given)."""
        return any(
            all(
                k in config and (config[k] == v or (isinstance(v, float) and math.isclose(config[k], v)))
                for k, v in a.items()
            )
            and len(a) == len(config)
            for a in self._anchors
        )

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._of(trial).on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get("epoch", 0) < self._max_t and self.is_anchor(trial.config):
            return self.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA per method: " + "; ".join(f"{m}: {s.debug_string()}" for m, s in self._rungs.items())


class ResumableASHA(ASHAScheduler):
    """ASHA whose metric and mode may be set again to the same values. :func:`replay_rungs` sets them on a
    restored search's scheduler before Tune does, and Tune refuses a scheduler whose metric is already set."""

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if self.metric is not None and (metric, mode) == (self.metric, self._mode):
            return True
        return super().set_search_properties(metric, mode, **spec)


def scheduler(config: PipelineConfig):
    """Early stopping: none, one ASHA over every trial (one method, one backbone), or :class:`MethodASHA`."""
    t = config.tune
    if not t.early_stopping:
        return FIFOScheduler()
    if define_by_run(config):
        return MethodASHA(
            max_t=config.train.epochs,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            anchors=starting_points(config),
        )
    return ResumableASHA(
        time_attr="epoch", max_t=config.train.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor
    )


def rung_epochs(config: PipelineConfig) -> list[int]:
    """The epochs where ASHA judges trials (``tune.grace_period`` × ``tune.reduction_factor``^k before the last
    epoch; a fractional one is judged at the first whole epoch past it): a trial validates on each of them
    whatever ``train.validate_every`` says. Empty without early stopping."""
    t = config.tune
    if not t.early_stopping:
        return []
    count = int(math.log(config.train.epochs / t.grace_period) / math.log(t.reduction_factor) + 1)
    return sorted({math.ceil(t.grace_period * t.reduction_factor**k) for k in range(count)})


def replay_rungs(scheduler, results, metric: str) -> int:
    """Feed every stored trial's per-epoch ``metric`` (``results``: a restored search's ResultGrid) into the
    rungs of ``scheduler``, in epoch order, as the uninterrupted search fed them; returns how many trials."""
    if not isinstance(scheduler, ASHAScheduler | MethodASHA):
        return 0
    scheduler.set_search_properties(metric, "max")
    fed = 0
    for result in results:
        frame, trial_id = result.metrics_dataframe, (result.metrics or {}).get("trial_id")
        if frame is None or not trial_id or "epoch" not in frame or metric not in frame:
            continue
        trial = SimpleNamespace(trial_id=trial_id, config=result.config)
        scheduler.on_trial_add(None, trial)
        for epoch, score in frame.sort_values("epoch")[["epoch", metric]].itertuples(index=False):
            if math.isfinite(score):
                scheduler.on_trial_result(None, trial, {"epoch": epoch, metric: score})
        fed += 1
    return fed
