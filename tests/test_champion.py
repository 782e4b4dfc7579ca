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
