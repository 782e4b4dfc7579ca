"""The pick, the leaderboard, the lift and the paired gate (pipeline.selection), and early stopping per method."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from pipeline.champion import decide
from pipeline.config import load
from pipeline.early_stopping import MethodASHA, scheduler
from pipeline.leaderboard import leaderboard, lift
from pipeline.search import cross_validated, trial_candidates
from pipeline.selection import BASELINE, Candidate, Outcomes, compare, finalists, pick, rank
from pipeline.significance import paired, paired_test


def outcomes(right) -> Outcomes:
    """Per-image results as two-class outcomes: class 0 every time, predicted 0 when right."""
    return Outcomes(tuple(0 for _ in right), tuple(0 if r else 1 for r in right), 2)


def cand(
    id: str,
    top1: float,
    method: str = "drtune",
    loss: float = 1.0,
    n: int = 120,
    status: str = "completed",
    baseline: bool = False,
) -> Candidate:
    return Candidate(id, method, top1, loss, n, status=status, baseline=baseline, config={"method": method})


def base(top1: float, n: int = 120, loss: float = 1.0) -> Candidate:
    return cand(BASELINE, top1, "ce", loss=loss, n=n, baseline=True)


def test_the_interval_is_agresti_caffo_and_its_width_follows_the_images() -> None:
    c = compare(cand("a", 0.95), cand("b", 0.90))
    pa, pb = (0.95 * 120 + 1) / 122, (0.90 * 120 + 1) / 122
    half = 1.959964 * math.sqrt(pa * (1 - pa) / 122 + pb * (1 - pb) / 122)
    assert c.gap == pytest.approx(0.05) and c.gap_images == pytest.approx(6.0)
    assert (c.low, c.high) == pytest.approx((0.05 - half, 0.05 + half))
    assert c.within_noise  # 6 of 120 images: noise
    assert not compare(cand("a", 0.95, n=2000), cand("b", 0.90, n=2000)).within_noise  # 100 of 2000: not
    assert not compare(cand("a", 1.0), cand("b", 0.5)).within_noise


def test_a_clear_best_wins_and_stopped_or_failed_trials_never_do() -> None:
    cands = [
        cand("a", 0.60),
        cand("b", 0.99, status="stopped"),
        cand("c", 0.95),
        cand("d", float("nan"), status="failed"),
        base(0.62),
    ]
    chosen = pick(cands)
    assert chosen.chosen.id == "c" and chosen.rule == "clear" and chosen.tied == ["c"]
    assert chosen.comparison.other == BASELINE and not chosen.comparison.within_noise
    assert [c.id for c in rank(cands)] == ["c", BASELINE, "a"]
    with pytest.raises(ValueError, match="no candidate completed"):
        pick([cand("b", 0.99, status="stopped")])


def test_the_baseline_is_a_candidate_and_can_win_the_pick() -> None:
    assert pick([cand("a", 0.70), base(0.90)]).chosen.id == BASELINE  # outright
    tie = pick([cand("a", 0.75, loss=0.5), cand("b", 0.74), base(0.733)])  # 2 images apart, baseline third
    assert tie.chosen.id == BASELINE and tie.rule == "conservative"
    assert set(tie.tied) == {"a", "b", BASELINE} and "plain fine-tuning" in tie.reason
    assert tie.comparison.gap_images == pytest.approx(1.2) and tie.comparison.within_noise
    no_base = pick([cand("a", 0.75), cand("b", 0.74), base(0.40)])
    assert no_base.chosen.id == "a" and no_base.rule == "conservative" and "not among them" in no_base.reason


def test_a_near_tie_asks_for_re_validation_of_the_tied_keeping_the_baseline_and_the_record_says_so() -> None:
    cands = [cand("a", 0.958), cand("b", 0.950), cand("c", 0.942), cand("d", 0.60), base(0.925)]
    chosen = finalists(cands, at_most=3)
    assert [c.id for c in chosen] == ["a", "b", BASELINE]  # d is clearly behind; the baseline replaces c at the cap
    assert finalists([cand("a", 0.95), cand("b", 0.40)], at_most=3) == []  # a clear best needs none
    # re-validated on 2 more folds: b is clearly best over 360 images
    again = {"a": [0.85, 0.86], "b": [0.97, 0.96], BASELINE: [0.90, 0.91]}
    scored = [c.revalidated(again[c.id]) for c in chosen]
    assert scored[1].cv_score == pytest.approx((0.95 + 0.97 + 0.96) / 3) and scored[1].n == 360
    by_id = {c.id: c for c in scored}
    result = pick([by_id.get(c.id, c) for c in cands])
    assert result.chosen.id == "b" and result.rule == "revalidated" and "3 held-out folds (360 images)" in result.reason
    record = result.record()
    assert record["rule"] == "revalidated" and record["scored_on_images"] == 360
    assert record["comparison"]["best"] == "b" and record["comparison"]["other"] == BASELINE
    assert not record["comparison"]["within_noise"]
    assert record["comparison"]["gap_images"] == pytest.approx((0.96 - (0.925 + 0.90 + 0.91) / 3) * 360)  # 17.4
    # still tied on the pooled folds: the conservative rule decides, among the re-validated only
    close = [c.revalidated([c.val_score, c.val_score]) for c in chosen]
    by_id = {c.id: c for c in close}
    assert pick([by_id.get(c.id, c) for c in cands]).chosen.id == BASELINE


def test_the_leaderboard_entry_of_the_picked_method_is_the_pick() -> None:
    cands = [cand("a", 0.75), cand("p", 0.74, "ce"), cand("s", 0.99, "l2sp", status="stopped"), base(0.74)]
    chosen = pick(cands)
    assert chosen.chosen.id == BASELINE
    board = leaderboard(cands, chosen, ["drtune", "ce", "l2sp"])
    assert board["ce"]["best_trial"] == BASELINE and board["ce"]["trials"] == 1 and board["ce"]["completed"] == 2
    assert board["drtune"]["best_trial"] == "a" and board["l2sp"]["best_trial"] is None
    assert board["l2sp"]["stopped_early"] == 1
    assert lift({m: e["best_val_top1"] for m, e in board.items()}) == pytest.approx(0.75 - 0.74)
    assert lift({"drtune": None, "ce": 0.7}) is None and lift({"drtune": 0.7}) is None


def test_mcnemar_on_a_crafted_prediction_set() -> None:
    """200 images: both right on 150, only the baseline on 20, only the challenger on 5, both wrong on 25.
    Under "equally good" the 25 split ones are fair coin tosses: P(≤ 5 of 25) × 2 = 0.004077 (exact)."""
    challenger = [True] * 150 + [False] * 20 + [True] * 5 + [False] * 25
    baseline = [True] * 150 + [True] * 20 + [False] * 5 + [False] * 25
    t = paired_test(challenger, baseline)
    assert (t.n, t.only_a, t.only_b) == (200, 5, 20)
    exact = 2 * sum(math.comb(25, k) for k in range(6)) / 2**25
    assert t.p_value == pytest.approx(exact) and t.p_value == pytest.approx(0.004077, abs=1e-6)
    assert t.difference == pytest.approx(-15 / 200)
    low, high = t.interval()
    assert low < -0.075 < high < 0
    promoted, why = decide(0.775, None, "no champion yet", vs_baseline=t)
    assert not promoted and "did not beat plain fine-tuning" in why and "CE-tuning's model is better" in why
    assert "15 more of 200" in why and "beyond the noise" in why
    # one image behind: still not promoted, and the decision says it is within the noise
    close = paired_test([True] * 10 + [False], [True] * 11)
    assert close.p_value == 1.0 and not decide(0.9, None, "no champion yet", vs_baseline=close)[0]
    # the challenger that is the baseline's own model (same predictions) passes the gate
    same = paired_test(challenger, challenger)
    assert same.p_value == 1.0 and decide(0.775, None, "no champion yet", vs_baseline=same) == (
        True,
        "promoted: no champion yet",
    )
    better = paired_test(baseline, challenger)
    assert decide(0.85, 0.80, "re-scored", vs_baseline=better)[0]
    with pytest.raises(ValueError):
        paired_test([True], [True, False])


def _trial(tid: str, config: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config)


def test_per_method_rungs_never_stop_a_slow_starters_starting_point() -> None:
    """Rungs at epochs 1 and 2 (grace 1, reduction 2, 4 epochs). Two fast linear-probe trials reach 0.9 at
    epoch 1; DR-Tune's starting point is at 0.3 there. One shared ASHA stops it; per-method rungs do not,
    and a weaker DR-Tune trial is still stopped by its own method's rung."""
    p = load(
        None,
        ["tune.methods=[drtune, linear_probe]", "train.epochs=4", "tune.grace_period=1", "tune.reduction_factor=2"],
    )
    s = scheduler(p)
    assert isinstance(s, MethodASHA)
    s.set_search_properties("val_top1", "max")
    anchor = next(a for a in s._anchors if a["method"] == "drtune")
    trials = [
        _trial("lp1", {"method": "linear_probe", "linear_probe.lr_head": 0.2}),
        _trial("lp2", {"method": "linear_probe", "linear_probe.lr_head": 0.05}),
        _trial("dr0", dict(anchor)),
        _trial("dr1", {**anchor, "drtune.lam": 7.0}),
    ]
    for t in trials:
        s.on_trial_add(None, t)

    def result(t, epoch: int, top1: float) -> str:
        return s.on_trial_result(None, t, {"epoch": epoch, "val_top1": top1})

    assert result(trials[0], 1, 0.90) == TrialScheduler.CONTINUE
    assert result(trials[1], 1, 0.92) == TrialScheduler.CONTINUE
    assert result(trials[2], 1, 0.30) == TrialScheduler.CONTINUE  # the first of its method at the rung
    assert result(trials[2], 2, 0.60) == TrialScheduler.CONTINUE
    assert result(trials[3], 1, 0.20) == TrialScheduler.STOP  # below DR-Tune's own rung (0.30)
    # the anchor is never stopped, even below its method's rung
    s2 = scheduler(p)
    s2.set_search_properties("val_top1", "max")
    late = _trial("dr2", dict(anchor))
    for t in (trials[3], late):
        s2.on_trial_add(None, t)
    assert s2.on_trial_result(None, trials[3], {"epoch": 1, "val_top1": 0.5}) == TrialScheduler.CONTINUE
    assert s2.on_trial_result(None, late, {"epoch": 1, "val_top1": 0.1}) == TrialScheduler.CONTINUE
    assert s2.on_trial_result(None, late, {"epoch": 4, "val_top1": 0.9}) == TrialScheduler.STOP  # the end: max_t
    # a single-method search keeps one ASHA
    assert type(scheduler(load(None, []))).__name__ == "ResumableASHA"  # ASHA, whose metric a restore may set again


def _result(trial_id: str, top1: float, epoch: int, loss: float = 1.0, error=None, method: str | None = None):
    metrics = {
        "val_top1": top1,
        "val_loss": loss,
        "epoch": epoch,
        "trial_id": trial_id,
        "checkpoint_path": f"/ck/{trial_id}",
    }
    return SimpleNamespace(
        error=error,
        metrics=metrics,
        config={"lam": 1.0, **({"method": method} if method else {})},
        path=f"/runs/{trial_id}",
    )


class _Grid(list):
    """A Tune ``ResultGrid`` as :func:`trial_candidates` reads it: its results, and the trials they came from
    (:func:`pipeline.compat.trials_of`), which keep a trial's id and config when it never reported."""

    def __init__(self, results: list, trials: dict | None = None) -> None:
        super().__init__(results)
        trials = trials or {}
        self._experiment_analysis = SimpleNamespace(
            trials=[
                trials[r.path]
                if r.config is None
                else SimpleNamespace(trial_id=r.metrics.get("trial_id"), config=r.config)
                for r in results
            ]
        )


def test_trials_become_candidates_with_their_status() -> None:
    results = [
        _result("a", 0.70, 10),
        _result("b", 0.95, 3),
        _result("c", 0.99, 10, error=RuntimeError("x")),
        _result("d", 0.70, 10, loss=0.5, method="l2sp"),
        _result("e", float("nan"), 2),
    ]
    cands = trial_candidates(_Grid(results), max_epochs=10, n_val=40, method="drtune")
    assert [(c.id, c.method, c.status) for c in cands] == [
        ("a", "drtune", "completed"),
        ("b", "drtune", "stopped"),
        ("c", "drtune", "failed"),
        ("d", "l2sp", "completed"),
        ("e", "drtune", "failed"),
    ]
    assert cands[3].ref.path == "/ck/d" and cands[1].ref is None and cands[0].n_val == 40
    assert [c.id for c in rank(cands)] == ["d", "a"]  # tie on top-1 → lower loss
    # the time budget ran out: a trial short of its last epoch that did not end on its own was cut by it
    ended = {"a", "d"}  # finished (ASHA stopped none here)
    grid = _Grid(results + [_result("f", 0.5, 1)])
    cut = trial_candidates(grid, max_epochs=10, n_val=40, method="drtune", ended=ended)
    assert [c.status for c in cut] == ["completed", "cut", "failed", "completed", "failed", "cut"]
    ended |= {"b"}  # b was stopped by ASHA: it ended on its own
    # stopped before its first report: Tune's result has no metrics and no config, its trial has both
    unstarted = SimpleNamespace(error=None, metrics={}, config=None, path="/runs/g")
    trial = SimpleNamespace(trial_id="g", config={"lam": 2.0, "method": "l2sp"})
    cut = trial_candidates(_Grid([*results, unstarted], {"/runs/g": trial}), 10, 40, "drtune", ended=ended)
    assert cut[1].status == "stopped" and cut[5].status == "cut"  # stopped before its first epoch: no failure
    assert (cut[5].id, cut[5].method, cut[5].config) == ("g", "l2sp", {"lam": 2.0, "method": "l2sp"})


def test_refits_pool_into_the_finalists_scores_and_a_fold_they_diverge_on_scores_zero() -> None:
    chosen = [cand("b", 0.82), cand("a", 0.80)]

    def refit(finalist: int, fold: int, top1: float, diverged: bool = False, epoch: int = 10) -> SimpleNamespace:
        metrics = {"val_top1": top1, "epoch": epoch, **({"diverged": 1.0} if diverged else {})}
        return SimpleNamespace(error=None, metrics=metrics, config={"finalist": finalist, "fold": fold})

    refits = [refit(0, 1, 0.70), refit(0, 2, 0.74), refit(1, 1, 0.80), refit(1, 2, 0.81)]
    scored = cross_validated(chosen, _Grid(refits), max_epochs=10)
    assert [c.id for c in scored] == ["b", "a"] and [c.folds for c in scored] == [3, 3]
    assert scored[0].cv_score == pytest.approx((0.82 + 0.70 + 0.74) / 3)
    assert scored[1].cv_score == pytest.approx((0.80 + 0.80 + 0.81) / 3)
    diverged = cross_validated(chosen, _Grid(refits[:3] + [refit(1, 2, float("nan"), diverged=True, epoch=2)]), 10)
    assert diverged[1].cv_score == pytest.approx((0.80 + 0.80 + 0.0) / 3)
    with pytest.raises(RuntimeError, match="finalist a on extra fold 2 did not finish"):
        cross_validated(chosen, _Grid(refits[:3] + [refit(1, 2, 0.5, epoch=6)]), max_epochs=10)
    # a refit that failed before its first report: Tune's result has no config, its trial names the finalist
    unreported = SimpleNamespace(error=RuntimeError("no worker"), metrics={}, config=None, path="/runs/r")
    trial = SimpleNamespace(trial_id="r", config={"finalist": 1, "fold": 2})
    with pytest.raises(RuntimeError, match="finalist a on extra fold 2 did not finish"):
        cross_validated(chosen, _Grid([*refits[:3], unreported], {"/runs/r": trial}), max_epochs=10)
    # per image: each fold's results appended in fold order; a fold it diverged on is every image wrong
    scored_on_val = [c.with_outcomes(outcomes((True, False))) for c in chosen]
    images = {(0, 1): (True, True), (0, 2): (False, False), (1, 1): (True, False), (1, 2): (False, True)}

    def on_fold(fold: int, refit) -> Outcomes:
        return outcomes((False, False) if refit is None else images[refit.config["finalist"], fold])

    scored = cross_validated(
        [replace(c, n_val=2) for c in scored_on_val],
        _Grid(refits[:3] + [refit(1, 2, float("nan"), True, 2)]),
        10,
        "top1",
        on_fold,
    )
    assert scored[0].outcomes == outcomes((True, False, True, True, False, False))
    assert scored[1].outcomes == outcomes((True, False, True, False, False, False))


def test_revalidation_settings_name_the_field() -> None:
    from drtune.config import ConfigError

    with pytest.raises(ConfigError, match=r"tune.finalists.*greater than or equal to 2"):
        load(None, ["tune.finalists=1"])
    with pytest.raises(ConfigError, match=r"tune.revalidate.*'auto', 'always' or 'never'"):
        load(None, ["tune.revalidate=sometimes"])
    with pytest.raises(ConfigError, match=r"tune.finalist_folds = 5:.*at most 4 folds.*data.val_fraction = 0.2"):
        load(None, ["tune.finalist_folds=5"])
    assert load(None, ["tune.revalidate=never", "tune.finalist_folds=5"]).tune.finalist_folds == 5
    assert np.isclose(load(None, []).tune.finalists, 3)


def test_the_baseline_candidate_must_share_the_searchs_data_and_schedule(tmp_path) -> None:
    import json

    from drtune.config import ConfigError
    from pipeline.choosing import baseline_candidate

    p = load(None, ["train.epochs=10"])
    assert baseline_candidate(tmp_path, p, "abc", 120) is None  # the baseline stage has not run here
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "baseline.safetensors").write_bytes(b"weights")
    record = {
        "val_top1": 0.7,
        "val_loss": 0.9,
        "epochs": 10,
        "data_sha256": "abc",
        "mlflow_run_id": "r",
        "lr_backbone": 0.01,
        "lr_head": 0.1,
    }
    (tmp_path / "models" / "baseline.json").write_text(json.dumps(record))
    c = baseline_candidate(tmp_path, p, "abc", 120)
    assert c.baseline and c.id == BASELINE and c.method == "ce" and c.n_val == 120 and c.val_score == 0.7
    assert c.config == {"method": "ce", "lr_backbone": 0.01, "lr_head": 0.1}  # retrains as itself on a fold
    with pytest.raises(ConfigError, match="other data or for 10 epochs.*run the baseline stage again"):
        baseline_candidate(tmp_path, p, "other data", 120)
    with pytest.raises(ConfigError, match="train.epochs = 5"):
        baseline_candidate(tmp_path, load(None, ["train.epochs=5", "tune.grace_period=2"]), "abc", 120)
    with pytest.raises(ConfigError, match="another backbone than the pretrain stage's models/pretrained/"):
        baseline_candidate(tmp_path, p, "abc", 120, backbone_sha256="f00d")  # the search starts from a new backbone


def test_the_tune_stage_re_validates_only_when_asked_and_only_the_tied() -> None:
    from pipeline.choosing import choose

    cands = [cand("a", 0.75), cand("b", 0.74), cand("c", 0.30), base(0.733)]
    calls = []

    def revalidate(finalists: list[Candidate]) -> list[Candidate]:
        calls.append([c.id for c in finalists])
        return [c.revalidated([0.95 if c.id == "b" else 0.70] * 2) for c in finalists]

    chosen, scored = choose(load(None, []), cands, revalidate)  # auto: a, b and the baseline are tied
    assert calls == [["a", "b", BASELINE]] and [c.id for c in scored] == ["a", "b", BASELINE]
    assert chosen.chosen.id == "b" and chosen.rule == "revalidated"
    chosen, scored = choose(load(None, ["tune.revalidate=never"]), cands, revalidate)
    assert len(calls) == 1 and scored == [] and chosen.chosen.id == BASELINE and chosen.rule == "conservative"
    chosen, _ = choose(
        load(None, ["tune.revalidate=always", "tune.finalists=2"]),
        [cand("a", 0.9, n=5000), cand("b", 0.3, n=5000)],
        revalidate,
    )
    assert calls[-1] == ["a", "b"]  # always: the top two, tied or not
    chosen, scored = choose(load(None, []), [cand("a", 0.9, n=5000), cand("b", 0.3, n=5000)], revalidate)
    assert len(calls) == 2 and scored == [] and chosen.rule == "clear"  # auto: a clear best needs none


def test_a_paired_comparison_separates_what_the_unpaired_interval_cannot() -> None:
    """120 validation images, 100 against 88 right. If b gets right only images a gets right too, all 12
    disagreements favour a: p = 2 · 0.5¹² (exact), a clear winner, though the unpaired interval calls it a tie.
    With the same scores but 52 disagreements (32 for a, 20 for b) it is noise (p ≈ 0.13)."""
    a_right = [True] * 100 + [False] * 20
    a = cand("a", 100 / 120).with_outcomes(outcomes(a_right))
    b = cand("b", 88 / 120).with_outcomes(outcomes([True] * 88 + [False] * 32))
    assert compare(cand("a", 100 / 120), cand("b", 88 / 120)).within_noise  # unpaired
    paired = compare(a, b)
    assert paired.p_value == pytest.approx(2 * 0.5**12) and not paired.within_noise
    assert paired.gap_images == 12 and paired.gap == pytest.approx(0.1) and "paired" in paired.words()
    assert pick([a, b, base(0.70).with_outcomes(outcomes([True] * 84 + [False] * 36))]).rule == "clear"
    noisy = compare(a, cand("b", 88 / 120).with_outcomes(outcomes([False] * 32 + [True] * 88)))
    assert noisy.within_noise and noisy.p_value == pytest.approx(0.1263, abs=1e-3)
    # re-validation appends each fold's images after the validation split's
    again = a.revalidated([0.5], [outcomes((True, False))])
    assert again.outcomes == outcomes((*a_right, True, False)) and again.folds == 2
    assert cand("x", 0.5).revalidated([0.5], [outcomes((True,))]).outcomes is None  # none on validation: none after


def test_a_restored_search_stops_the_weak_trial_its_uninterrupted_self_stops() -> None:
    """Grace 1, reduction factor 2: three trials score 3, 2 and 1 at every epoch, then a weak fourth scores 0.01
    at epoch 1. Uninterrupted, ASHA stops it there; restored (a fresh scheduler, as Tuner.restore gives), the rungs
    are empty and it runs on, unless the stored trials' histories are replayed into them."""
    import pandas as pd

    from pipeline.early_stopping import replay_rungs

    p = load("configs/quick.yaml", ["train.epochs=4", "tune.grace_period=1", "tune.reduction_factor=2"])
    stored = [
        SimpleNamespace(
            metrics={"trial_id": f"t{i}"},
            config={"lr_head": 0.01 * (i + 1)},
            metrics_dataframe=pd.DataFrame({"epoch": [1, 2, 3, 4], "val_top1": [score] * 4}),
        )
        for i, score in enumerate((3.0, 2.0, 1.0))
    ]
    weak = SimpleNamespace(trial_id="t3", config={"lr_head": 0.04})

    def first_epoch_of_the_weak_trial(asha) -> str:
        asha.on_trial_add(None, weak)
        return asha.on_trial_result(None, weak, {"epoch": 1, "val_top1": 0.01})

    uninterrupted = scheduler(p)
    uninterrupted.set_search_properties("val_top1", "max")
    for r in stored:
        trial = SimpleNamespace(trial_id=r.metrics["trial_id"], config=r.config)
        uninterrupted.on_trial_add(None, trial)
        for epoch, score in r.metrics_dataframe.itertuples(index=False):
            uninterrupted.on_trial_result(None, trial, {"epoch": epoch, "val_top1": score})
    assert first_epoch_of_the_weak_trial(uninterrupted) == "STOP"

    restored = scheduler(p)
    restored.set_search_properties("val_top1", "max")
    assert first_epoch_of_the_weak_trial(restored) == "CONTINUE"  # what Tuner.restore alone does
    replayed = scheduler(p)
    assert replay_rungs(replayed, stored, "val_top1") == 3
    assert first_epoch_of_the_weak_trial(replayed) == "STOP"
    assert [dict(r) for _, r in replayed._brackets[0]._rungs] == [dict(r) for _, r in uninterrupted._brackets[0]._rungs]


@pytest.mark.slow
def test_a_search_interrupted_and_restored_by_ray_stops_the_weak_trial_as_uninterrupted(tmp_path, monkeypatch) -> None:
    """The issue's scenario through Ray itself: ASHA (grace 1, reduction factor 2, 4 epochs), four trials one at a
    time scoring 3, 2, 1 and a weak 0.01 at every epoch. The weak trial sends the driver a Ctrl-C before its first
    report, once; the search is restored by the stage's own Tuner builder. Uninterrupted, ASHA stops it at epoch 1;
    restored, it must stop there too, and it runs every epoch when the stored trials are not replayed."""
    import os
    import signal
    import time

    import ray
    from ray import tune

    from pipeline import cluster, search

    p = load("configs/quick.yaml", ["train.epochs=4", "tune.grace_period=1", "tune.reduction_factor=2"])
    p.ray.num_cpus, p.ray.cpus_per_worker = 1, 1.0  # one trial at a time, in grid order
    driver_pid, marker = os.getpid(), tmp_path / "interrupted"

    def trainable(config: dict) -> None:
        if config["score"] < 0.1 and config["interrupt"] and not marker.exists():
            marker.touch()
            os.kill(driver_pid, signal.SIGINT)  # Ctrl-C before the weak trial reports anything
            time.sleep(120)
        for epoch in range(1, 5):
            tune.report({"epoch": epoch, "val_top1": config["score"], "trial_id": tune.get_context().get_trial_id()})

    def epochs_run(name: str, interrupt: bool) -> dict[float, int]:
        space = {"score": tune.grid_search([3.0, 2.0, 1.0, 0.01]), "interrupt": interrupt}
        tuner = search._tuner(
            p, trainable, str(tmp_path / "ray"), name, [], space, metric="val_top1", mode="max", scheduler=scheduler(p)
        )
        results = tuner.fit()
        if interrupt:  # Tune saved its state and returned a partial result: not taken for a search; run it again
            assert marker.exists()
            with pytest.raises(KeyboardInterrupt, match="cut"):
                search.require_finished(results, 4, "cut")
            results = search._tuner(p, trainable, str(tmp_path / "ray"), name, [], space).fit()
            search.require_finished(results, 4, "unused")
        return {r.config["score"]: int(r.metrics["epoch"]) for r in results}

    cluster.start_ray(p)
    try:
        # uninterrupted, ASHA runs the first trial to the end and stops the others at their first rung: the
        # rung holds [3] when 2 arrives, [3, 2] when 1 does, [3, 2, 1] when 0.01 does (the scheduler-level test
        # above runs that uninterrupted search; here Ray's own restore must end the same way)
        uninterrupted = {3.0: 4, 2.0: 1, 1.0: 1, 0.01: 1}
        assert epochs_run("restored", interrupt=True) == uninterrupted
        marker.unlink()
        monkeypatch.setattr(search, "replay_rungs", lambda *args: 0)  # what Tuner.restore alone gives
        assert epochs_run("not-replayed", interrupt=True)[0.01] == 4
    finally:
        ray.shutdown()


def _imbalanced_candidates(metric: str) -> list[Candidate]:
    """100 validation images, 90 of class 0 and 10 of class 1. ``a`` calls everything class 0 (top-1 0.90,
    balanced accuracy 0.50); ``b`` finds every class-1 image but misses 15 class-0 ones (top-1 0.85, balanced
    accuracy 0.92). Their validation scores come from their predictions, as a trial's report does."""
    from drtune.evaluation import confusion_of, metric_scores

    labels = np.array([0] * 90 + [1] * 10)
    predicted = {"a": np.zeros(100, int), "b": np.array([0] * 75 + [1] * 15 + [1] * 10)}
    results = []
    for trial, guess in predicted.items():
        scores = metric_scores(confusion_of(labels, guess, 2))
        results.append(_result(trial, scores["top1"], 10))
        results[-1].metrics |= {f"val_{k}": v for k, v in scores.items()}
    cands = trial_candidates(_Grid(results), max_epochs=10, n_val=100, method="drtune", metric=metric)
    return [c.with_outcomes(Outcomes(tuple(labels), tuple(predicted[c.id]), 2)) for c in cands]


@pytest.mark.parametrize(("metric", "winner"), [("top1", "a"), ("balanced_accuracy", "b"), ("macro_f1", "b")])
def test_the_metric_changes_the_pick_on_an_imbalanced_validation_split(metric: str, winner: str) -> None:
    cands = _imbalanced_candidates(metric)
    chosen = pick(cands)
    assert chosen.chosen.id == winner
    if metric == "top1":  # 15 against 10 images: McNemar calls it noise, and the top score stands
        assert chosen.rule == "conservative" and "McNemar" in chosen.comparison.words()
    else:  # the minority class decides, beyond the noise of a permutation test
        assert chosen.rule == "clear" and chosen.comparison.p_value < 0.05
        assert "permutation" in chosen.comparison.words() and chosen.record()["comparison"]["test"] == "permutation"


def test_the_permutation_test_is_seeded_symmetric_and_calls_identical_models_equal() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 300)
    a = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    b = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    first, again = paired(labels, a, b, "macro_f1", 4), paired(labels, a, b, "macro_f1", 4)
    assert first == again  # seeded: the same p-value on every run
    flipped = paired(labels, b, a, "macro_f1", 4)
    assert flipped.difference == pytest.approx(-first.difference) and flipped.p_value == pytest.approx(first.p_value)
    low, high = first.interval()
    assert low < first.difference < high
    same = paired(labels, a, a, "balanced_accuracy", 4)
    assert same.p_value == 1.0 and same.difference == 0.0
    assert paired(labels, a, b, "top1", 4) == paired_test(list(a == labels), list(b == labels))  # top-1: McNemar
    gate = decide(
        0.5, None, "no champion yet", vs_baseline=paired(labels, labels * 0, labels, "macro_f1", 4), metric="macro_f1"
    )
    assert not gate[0] and "macro-F1" in gate[1] and "permutation p" in gate[1]


def test_the_metrics_and_the_per_class_table_are_scikit_learns() -> None:
    """On predictions where one class never occurs in the split and another is never predicted."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

    from drtune.evaluation import confusion_of, metric_scores, per_class

    rng = np.random.default_rng(4)
    labels = rng.choice([0, 1, 2, 4], 200)  # class 3 absent from the split
    predicted = np.where(rng.random(200) < 0.6, labels, rng.choice([0, 1, 3, 4], 200))  # class 2 never predicted
    scores = metric_scores(confusion_of(labels, predicted, 5))
    assert scores["top1"] == pytest.approx(float(np.mean(labels == predicted)))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0))
    table = per_class(confusion_of(labels, predicted, 5), list("abcde"))
    p, r, f, support = precision_recall_fscore_support(labels, predicted, labels=range(5), zero_division=0)
    assert [row["support"] for row in table] == list(support)
    for row, *expected in zip(table, p, r, f, strict=True):
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(tuple(expected))
