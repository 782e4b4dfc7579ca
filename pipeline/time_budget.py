"""A wall-clock budget for the search (``tune.time_budget_s``), counted across interrupts and resumes.

When the budget runs out, Tune stops every running trial and starts no new one; the pick is then among
the trials that finished their schedule, as always (a trial cut short is not a finished model). Those
trials are reported as cut by the budget (status ``cut``, the MLflow run's ``outcome``), not as stopped by ASHA.
The re-validation of tied finalists (:func:`pipeline.choosing.revalidation`) spends what is left of the budget:
with none left, or none left before every refit finished, the tie goes to the conservative rule.

Ray's own ``TuneConfig(time_budget_s)`` starts counting again when a search is restored, so a search
interrupted twice could run three budgets. Here the time spent is stored beside the search
(``drtune-time.json`` in its Ray experiment folder, local or on object storage) each time the stage
stops, for whatever reason, and a resumed search is given what is left. A stage killed with SIGKILL
cannot store it: that attempt's time is not counted. A search whose budget ran out is finished (Tune
marks its searcher done); a larger ``tune.time_budget_s`` names a new search, which starts afresh.
"""

from __future__ import annotations

import json
import time

import pyarrow.fs
from ray import tune

from pipeline.cluster import filesystem_and_path

SPENT_FILE = "drtune-time.json"


class TimeBudget(tune.Stopper):
    """Stop the whole search once ``spent_s`` (before this attempt) plus this attempt's time reaches ``budget_s``.

    ``ended`` holds the trials that ended on their own, finished or stopped by ASHA (:class:`TrialEnds` adds
    them, :meth:`store` keeps them across resumes): when the budget stops the search, a trial short of
    its last epoch that is not among them was cut by the budget, not judged by ASHA."""

    def __init__(self, budget_s: float, spent_s: float = 0.0, ended: set[str] | None = None) -> None:
        self.budget_s, self.spent_before = budget_s, spent_s
        self.ended = set(ended or ())
        self.started = time.monotonic()
        self.fired = False  # whether it stopped the search (not merely: whether time has run out since)

    @classmethod
    def resumed(cls, budget_s: float, experiment: str) -> TimeBudget:
        """The budget of the search stored at ``experiment`` (a local folder or an object-storage URI): what it
        spent and which trials ended on their own, read from ``drtune-time.json`` (nothing stored: a new one)."""
        fs, path = filesystem_and_path(experiment)
        stored = {}
        if fs.get_file_info(f"{path}/{SPENT_FILE}").type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(f"{path}/{SPENT_FILE}") as f:
                stored = json.loads(f.read())
        return cls(budget_s, float(stored.get("spent_s", 0.0)), set(stored.get("ended", [])))

    def store(self, experiment: str) -> float:
        """Write the time spent and the trials that ended on their own beside the search (the folder exists
        once Tune has started it); returns the seconds written, one reading for the stage's outputs too."""
        spent = self.spent()
        fs, path = filesystem_and_path(experiment)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{SPENT_FILE}") as f:
            f.write(json.dumps({"spent_s": round(spent, 3), "ended": sorted(self.ended)}).encode())
        return spent

    def spent(self) -> float:
        """Seconds spent on this search, this attempt included."""
        return self.spent_before + time.monotonic() - self.started

    def exhausted(self) -> bool:
        return self.spent() >= self.budget_s

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False  # no single trial is stopped by the budget; stop_all stops them together

    def stop_all(self) -> bool:
        self.fired = self.fired or self.exhausted()
        return self.fired


class TrialEnds(tune.Callback):
    """Adds to ``budget.ended`` each trial that ended on its own: one Tune reports complete before the budget
    stopped the search (finished, or stopped by ASHA). What ends after that was stopped by the budget.

    A restored search brings back the callbacks pickled with it; this one pickles as a reference to the
    instance of the running stage (as :class:`pipeline.trial_runs.TrialRuns` does), whose budget is the live
    stopper, so the trials that end after a resume are counted too."""

    _live: TrialEnds | None = None

    def __init__(self, budget: TimeBudget) -> None:
        self.budget = budget
        TrialEnds._live = self

    def __reduce__(self):
        return _live_trial_ends, ()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not self.budget.fired:
            self.budget.ended.add(trial.trial_id)


def _live_trial_ends() -> TrialEnds:
    if TrialEnds._live is None:
        raise RuntimeError("a stored search's TrialEnds was restored before this stage created its own")
    return TrialEnds._live
