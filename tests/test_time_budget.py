"""The search's wall-clock budget (pipeline.time_budget): it stops the search, and a resumed search gets what is left."""

from __future__ import annotations

import time

import pytest

from pipeline.config import load
from pipeline.time_budget import TimeBudget, TrialEnds


def test_the_time_spent_is_stored_beside_the_search_and_counted_on_resume(tmp_path, monkeypatch) -> None:
    experiment = str(tmp_path / "search-x")
    assert TimeBudget.resumed(60, experiment).spent_before == 0.0  # a new search
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    first = TimeBudget.resumed(60, experiment)
    clock[0] += 45
    assert first.spent() == 45 and not first.stop_all() and not first("trial", {"epoch": 1})
    first.ended.add("trial")
    assert first.store(experiment) == 45  # the stage stopped (Ctrl-C, a crash it survived, the end)
    resumed = TimeBudget.resumed(60, experiment)
    assert resumed.ended == {"trial"}
    clock[0] += 14.9
    assert not resumed.exhausted()
    clock[0] += 0.1
    assert resumed.spent() == pytest.approx(60) and resumed.stop_all()  # 45 s before + 15 s now


def test_a_budget_alone_needs_no_trial_count_but_something_must_end_the_search() -> None:
    from drtune.config import ConfigError

    assert load(None, ["tune.num_samples=null", "tune.time_budget_s=600"]).tune.num_samples is None
    with pytest.raises(ConfigError, match="tune.num_samples is null .* tune.time_budget_s is not set"):
        load(None, ["tune.num_samples=null"])


@pytest.mark.slow
def test_a_search_stops_when_its_budget_runs_out_and_a_rerun_runs_nothing_more(tmp_path) -> None:
    """Through Ray: trials of 4 epochs of 0.5 s, one at a time, as many as the budget allows (no trial count).
    A 20 s budget (room for a trial to finish on a busy machine) stops the search with a trial cut short; run
    again (a rerun of the stage), no trial runs: the time is spent. (Tune marks a search stopped by its stopper
    as finished, so a larger budget is a new search: ``tune.time_budget_s`` is part of the search's name.)"""
    import ray
    from ray import tune

    from pipeline import cluster, search

    p = load("configs/quick.yaml", ["train.epochs=4", "tune.num_samples=null", "tune.time_budget_s=20"])
    p.ray.num_cpus, p.ray.cpus_per_worker = 1, 1.0
    experiment = str(tmp_path / "ray" / "budget")

    def trainable(config: dict) -> None:
        for epoch in range(1, 5):
            time.sleep(0.5)
            tune.report({"epoch": epoch, "val_top1": config["x"], "trial_id": tune.get_context().get_trial_id()})

    def attempt(budget_s: float):
        budget = TimeBudget.resumed(budget_s, experiment)
        space = {"x": tune.uniform(0, 1)}
        tuner = search._tuner(
            p, trainable, str(tmp_path / "ray"), "budget", [TrialEnds(budget)], space, stop=budget, num_samples=-1
        )
        started = time.monotonic()
        try:
            results = tuner.fit()
        finally:
            budget.store(experiment)
        return results, time.monotonic() - started, budget

    cluster.start_ray(p)
    try:
        results, seconds, budget = attempt(20)
        done = [r for r in results if (r.metrics or {}).get("done")]
        assert budget.fired and seconds < 20 + 10  # stopped by the budget (Tune's own shutdown aside)
        assert 1 <= len(done) < len(results)  # at least one trial finished; the running one was cut
        ids = {r.metrics["trial_id"] for r in results if r.metrics}
        assert budget.ended == {r.metrics["trial_id"] for r in done} and budget.ended < ids  # Tune told of no cut one
        with pytest.raises(KeyboardInterrupt):  # the cut trial is no finished trial: the stage must not require them
            search.require_finished(results, None, "cut")
        again, seconds, budget = attempt(20)
        assert budget.spent_before >= 20 and len(again) == len(results) and seconds < 10  # nothing more runs
        assert budget.ended == {r.metrics["trial_id"] for r in done}  # kept across the rerun
    finally:
        ray.shutdown()


NOTHING_FINISHES = """
overrides = ["train.epochs=200", "tune.num_samples=null", "tune.time_budget_s=25"]
settings(*overrides)  # the prepared splits; then the stage as `dvc repro` runs it, with the same settings
sys.exit(tune.main(["--params", QUICK, *(a for o in [*overrides, TRACKING] for a in ("--set", o))]))
"""


@pytest.mark.slow
def test_the_stage_fails_and_writes_nothing_when_no_trial_finishes_in_the_budget(tmp_path) -> None:
    """The tune stage, on a budget no 200-epoch trial fits: a one-line error that names the budget, no outputs,
    and the trial it cut is recorded as cut by the budget (not as stopped by ASHA) in its MLflow run."""
    from fresh_search import run_search_script
    from mlflow.tracking import MlflowClient

    done = run_search_script(NOTHING_FINISHES, tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "tune: the time budget (tune.time_budget_s = 25 s) ran out before any of the" in done.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    trials = [r for r in client.search_runs([client.get_experiment_by_name("drtune-digits").experiment_id])]
    outcomes = {r.data.tags.get("outcome", "") for r in trials if "outcome" in r.data.tags}
    assert outcomes and all(o.startswith("cut by the time budget after") for o in outcomes), outcomes
