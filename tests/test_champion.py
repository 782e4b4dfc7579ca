"""The champion alias under concurrent registrations: a better champion that arrives mid-way stays champion."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.exceptions import MlflowException

from pipeline.champion import claim, decide


class Registry:
    """An MLflow client's alias calls on one registered model; ``after_set`` lets another writer act right after ours."""

    def __init__(self, champion: str | None, scores: dict[str, float], after_set=None) -> None:
        self.champion, self.scores, self.after_set, self.sets = champion, scores, after_set, []

    def get_model_version_by_alias(self, name: str, alias: str):
        if self.champion is None:
            raise MlflowException("no such alias")
        return SimpleNamespace(version=self.champion)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.champion = version
        self.sets.append(version)
        if self.after_set:
            self.after_set(self)
            self.after_set = None

    def rescore(self) -> tuple:
        v = self.champion
        return (v, self.scores[v], "re-scored on this test split", True) if v else (None, None, "no champion yet", True)


def judge_for(top1: float):
    return lambda champion: decide(top1, champion[1], champion[2], champion[3])


def test_a_better_champion_registered_meanwhile_stays_champion() -> None:
    registry = Registry("1", {"1": 0.80, "3": 0.95})
    registry.champion = "3"  # another machine promoted version 3 after this register read version 1
    promoted, decision = claim(registry, "m", "2", "1", registry.rescore, judge_for(0.90))
    assert not promoted and registry.champion == "3" and registry.sets == []
    assert decision.startswith("kept champion") and "0.9500" in decision


def test_a_worse_champion_registered_meanwhile_is_beaten_again() -> None:
    registry = Registry("1", {"1": 0.80, "3": 0.85})
    registry.champion = "3"
    promoted, decision = claim(registry, "m", "2", "1", registry.rescore, judge_for(0.90))
    assert promoted and registry.champion == "2" and decision.startswith("promoted") and "0.8500" in decision


def test_a_writer_that_moves_the_alias_right_after_ours_is_judged_on_the_read_back() -> None:
    def other_writer(registry: Registry) -> None:  # it had judged against version 1 and moves the alias after us
        registry.champion = "3"

    registry = Registry("1", {"1": 0.80, "3": 0.95}, after_set=other_writer)
    promoted, decision = claim(registry, "m", "2", "1", registry.rescore, judge_for(0.90))
    assert not promoted and registry.champion == "3" and decision.startswith("kept champion")
    # and the better challenger wins that race the other way round
    registry = Registry("1", {"1": 0.80, "3": 0.85}, after_set=other_writer)
    promoted, _ = claim(registry, "m", "2", "1", registry.rescore, judge_for(0.90))
    assert promoted and registry.champion == "2" and registry.sets == ["2", "2"]


def test_an_unchanged_champion_is_taken_with_the_decision_already_recorded() -> None:
    registry = Registry("1", {"1": 0.80})
    assert claim(registry, "m", "2", "1", registry.rescore, judge_for(0.90)) == (True, None)
    assert registry.champion == "2"


def test_only_a_ready_version_counts_as_registered_and_registry_errors_propagate() -> None:
    import pytest

    from pipeline.champion import CHECKSUM_TAG, registered_version

    versions = [
        SimpleNamespace(version="1", status="FAILED_REGISTRATION", tags={CHECKSUM_TAG: "abc"}),
        SimpleNamespace(version="2", status="READY", tags={CHECKSUM_TAG: "other"}),
    ]
    client = SimpleNamespace(search_model_versions=lambda query: versions)
    assert registered_version(client, "m", "abc") is None  # its registration failed: register the file again
    versions.append(SimpleNamespace(version="3", status="READY", tags={CHECKSUM_TAG: "abc"}))
    assert registered_version(client, "m", "abc").version == "3"

    def away(query):
        raise MlflowException("the registry does not answer")

    with pytest.raises(MlflowException):  # never taken for "not registered yet", which would register twice
        registered_version(SimpleNamespace(search_model_versions=away), "m", "abc")


def test_a_search_stored_under_a_path_with_a_quote_finds_its_parent_run_again(tmp_path) -> None:
    import pytest
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_store import experiment_id, literal, parent_run, run_exists

    assert literal("runs/a") == "'runs/a'" and literal("/home/o'brien/runs") == '"/home/o\'brien/runs"'
    with pytest.raises(ValueError, match="both quote characters"):
        literal("a'b\"c")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # not connect(): no global URI for later tests
    experiment = experiment_id(client, "quotes")
    path = "/home/o'brien/runs/search-1"
    first = parent_run(client, experiment, path, tags={}, run_name="search-1")
    assert parent_run(client, experiment, path, tags={}, run_name="search-1") == first
    # register asks before it writes: a best.json from a search tracked in another store is named, not a traceback
    assert run_exists(client, first) and not run_exists(client, "f" * 32)
