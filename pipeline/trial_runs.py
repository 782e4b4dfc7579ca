"""One MLflow child run per Ray Tune trial, kept by a callback in the driver, and made whole after an outage.

:class:`TrialRuns` is a Ray Tune callback (it runs in the driver, never in workers) that keeps one
child run per trial under the search's parent run: hyperparameters (and, under a preset, every
setting it changed, as ``resolved.<field>`` params), per-epoch metrics, and a final status. A
restored trial gets its old run back (looked up by its trial tag), never a second one.
While the tracking server does not answer, its writes are held in order and written when it is
back; :meth:`TrialRuns.reconcile` then makes every run agree with Tune's results, and
:meth:`TrialRuns.close_open_runs` marks runs of an interrupted search KILLED so none is left RUNNING.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import DatasetInput, Metric
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from pipeline import compat
from pipeline.config import PipelineConfig
from pipeline.mlflow_connect import TrackingUnavailableError, unreachable
from pipeline.mlflow_store import METRIC_KEYS, PARENT_TAG, TRIAL_TAG, literal, log_params
from pipeline.space import trial_config
from pipeline.time_budget import TimeBudget

_LIVE: TrialRuns | None = None  # the stage's TrialRuns; a restored Tuner's pickled copy resolves to it


def _live_trial_runs() -> TrialRuns:
    if _LIVE is None:
        raise RuntimeError("a search's TrialRuns callback was restored outside the tune stage")
    return _LIVE


class TrialRuns(Callback):
    """One MLflow child run per Tune trial, written from the driver.

    ``Tuner.restore`` brings back the callbacks pickled when the search first started; this one
    pickles as a reference to the stage's current instance (:meth:`__reduce__`), so a resumed
    search writes to today's tracking server and parent run, and the stage sees the writes Tune's
    calls held.

    A tracking server that goes away does not stop the search: the callback's MLflow writes are
    held, in order, and written when it answers again (one warning). :meth:`reconcile` then makes
    every trial's run agree with Tune's results, whatever was missed: epochs already logged are
    never logged twice, missing ones are added, and each run ends with its outcome.

    With ``base``, the search's configuration, a trial's params also name what a preset changed in
    its config (``resolved.train.lr_head`` …, :meth:`drtune.config.Config.preset_changes`).
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        parent_id: str,
        max_epochs: int,
        inputs: list[DatasetInput] = (),
        base: PipelineConfig | None = None,
    ) -> None:
        self.client, self.experiment, self.parent_id, self.max_epochs = client, experiment, parent_id, max_epochs
        self.base = base  # the search's configuration: what a trial's sampled values are applied to
        self.budget: TimeBudget | None = None  # the search's time budget, when it has one
        self.inputs = list(inputs)
        self.runs: dict[str, str] = {}
        self.logged: dict[str, set[int]] = {}  # epochs each run already has (asked of the store once per run)
        self.held: list[Callable[[], None]] = []  # writes waiting for the tracking server
        self.warned = False
        global _LIVE
        _LIVE = self

    def __reduce__(self):
        return _live_trial_runs, ()

    def _write(self, action: Callable[[], None]) -> None:
        """Run ``action`` after every held write, or hold it while the tracking server does not answer."""
        self.held.append(action)
        self.flush()

    def flush(self) -> bool:
        """Write what was held; False when the tracking server still does not answer."""
        while self.held:
            try:
                self.held[0]()
            except Exception as err:  # noqa: BLE001 - only "unreachable" is held; anything else is raised
                if not unreachable(err):
                    raise
                if not self.warned:
                    print(
                        f"warning: the MLflow tracking server does not answer ({type(err).__name__}); the search goes "
                        "on and its records are written when it is back",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.warned = True
                return False
            self.held.pop(0)
        if self.warned:
            print("the MLflow tracking server answers again; held records written", file=sys.stderr, flush=True)
            self.warned = False
        return True

    def _run(self, trial_id: str) -> str:
        """The trial's run: cached, else found in the store (a resumed search), else created."""
        run_id = self.runs.get(trial_id)
        if run_id is None:
            found = self.client.search_runs(
                [self.experiment],
                max_results=1,
                filter_string=f"tags.`{PARENT_TAG}` = {literal(self.parent_id)} and tags.`{TRIAL_TAG}` = {literal(trial_id)}",
            )
            run_id = (
                found[0].info.run_id
                if found
                else self.client.create_run(
                    self.experiment,
                    run_name=f"trial-{trial_id}",
                    tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id},
                ).info.run_id
            )
            self.runs[trial_id] = run_id
            self.logged[run_id] = {int(m.step) for m in self.client.get_metric_history(run_id, "val_top1")}
        return run_id

    def log_final(self, trial_id: str, metrics: dict[str, float]) -> None:
        """Numbers about a finished trial that come after it (its cross-validated score), on its run."""
        self._write(
            lambda: self.client.log_batch(
                self._run(trial_id),
                metrics=[Metric(k, float(v), int(time.time() * 1000), self.max_epochs) for k, v in metrics.items()],
            )
        )

    def _resolved(self, sampled: dict) -> dict:
        """``resolved.<field>``: each setting a preset changes in the trial's config (DR-Tune's ``reference``:
        its rates, weight decay, λ, rotation schedule), as the trial's workers train it; empty without one."""
        if self.base is None:
            return {}
        config = trial_config(self.base, sampled)
        changes = config.preset_changes(self.base.ray.workers_per_trial)
        return {f"resolved.{field}": new for field, (_, new) in changes.items()}

    def _start(self, trial_id: str, config: dict) -> str:
        run_id = self._run(trial_id)
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.client, run_id, config | self._resolved(config))
        if self.inputs and not self.client.get_run(run_id).inputs.dataset_inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)
        return run_id

    def _log_epoch(self, trial_id: str, result: dict) -> None:
        """One epoch's metrics, unless the run has them already (a result Tune saw again after a resume)."""
        run_id, step = self._run(trial_id), int(result.get("epoch", 0))
        if step in self.logged[run_id] or result.get("diverged"):
            return
        now = int(time.time() * 1000)
        # resumed_from_epoch: only in the first result of a restarted attempt
        metrics = [
            Metric(k, float(result[k]), now, step)
            for k in result
            if k in METRIC_KEYS or k.startswith("system/") or k == "resumed_from_epoch"
        ]
        self.client.log_batch(run_id, metrics=metrics)
        self.logged[run_id].add(step)
        if "resumed_from_epoch" in result:
            restarts = len(self.client.get_metric_history(run_id, "resumed_from_epoch"))
            self.client.set_tag(run_id, "attempts", str(restarts + 1))

    def _finish(self, trial_id: str, last: dict, error: str | None, cut: bool = False) -> None:
        """Tag the run with its outcome and end it: FINISHED (completed, stopped early by ASHA, or ``cut`` short by
        the time budget) or FAILED."""
        run_id = self._run(trial_id)
        epochs = int(last.get("epoch", 0))
        if error is None and last.get("diverged"):
            error = f"diverged, not retried: {last.get('error', 'non-finite loss')}"
        if error is not None:
            self.client.set_tag(run_id, "outcome", "failed")
            self.client.set_tag(run_id, "error", error[-4000:])
            self.client.set_terminated(run_id, "FAILED")
            return
        outcome = "completed" if epochs >= self.max_epochs else f"stopped by ASHA after {epochs} epochs"
        if cut and epochs < self.max_epochs:
            outcome = f"cut by the time budget after {epochs} epochs"
        self.client.set_tag(run_id, "outcome", outcome)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        self._write(lambda: self._start(trial_id, config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        trial_id, result = trial.trial_id, dict(result)
        self._write(lambda: self._log_epoch(trial_id, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        trial_id, last = trial.trial_id, dict(trial.last_result or {})
        cut = self.budget is not None and self.budget.fired  # what ends once the budget stopped the search
        self._write(lambda: self._finish(trial_id, last, None, cut))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        trial_id = trial.trial_id
        error_file = getattr(trial, "error_file", None)
        error = Path(error_file).read_text()[-4000:] if error_file and Path(error_file).is_file() else "unknown error"
        last = dict(trial.last_result or {})
        self._write(lambda: self._finish(trial_id, last, error))

    def reconcile(self, results, wait_s: float = 60.0, cut: set[str] = frozenset()) -> None:
        """Make every trial's run agree with Tune's ``results`` (a ``ResultGrid``): params, every reported
        epoch exactly once, outcome and status (``cut``: the trials the time budget cut short). Writes held
        during an outage come first; for them the tracking server is waited for up to ``wait_s`` seconds."""
        deadline = time.time() + wait_s
        self.held.append(lambda: self.client.search_experiments(max_results=1))  # the server answers
        while not self.flush() and time.time() < deadline:
            time.sleep(5)
        if self.held:
            raise TrackingUnavailableError(
                "the MLflow tracking server went away during the search and has not come "
                "back; the search itself is stored: run the stage again when it answers"
            )
        # every trial, those that never reported included (cut by the budget as they started, or failed then)
        for r, (trial_id, config) in zip(results, compat.trials_of(results), strict=True):
            metrics = r.metrics or {}
            self._start(trial_id, config)
            history = r.metrics_dataframe
            for row in [] if history is None else history.to_dict("records"):
                self._log_epoch(
                    trial_id, {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
                )
            error = None if r.error is None else f"{type(r.error).__name__}: {r.error}"[-4000:]
            self._finish(trial_id, metrics, error, trial_id in cut)

    def close_open_runs(self) -> None:
        """Mark child runs still RUNNING (an interrupted search) KILLED; a resume reopens them. With the
        tracking server away nothing can be marked: the next run of the stage reconciles them."""
        try:
            if not self.flush():
                return
            running = self.client.search_runs(
                [self.experiment],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and attributes.status = 'RUNNING'",
            )
            for run in running:
                self.client.set_terminated(run.info.run_id, "KILLED")
        except Exception as err:  # noqa: BLE001
            if not unreachable(err):
                raise
