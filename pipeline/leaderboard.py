"""The leaderboard: per method, its candidates counted by status and its best model (and, when the search
chose the backbone, the same per backbone: ``models/best.json: backbones``).

Built by the ``tune`` stage from the pick's order (so the overall pick is its method's entry), with
each method's best model written as ``models/leaderboard/<method>.safetensors``
(:func:`pipeline.choosing.write_models`); the ``register``
stage tests those models once and adds their test score (``tune.metric``). DR-Tune's lift is its best score minus
the best other method's, on validation (tune) and on test (register).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path

from drtune import methods
from drtune.inference import load_predictor
from pipeline.selection import Candidate, Pick


def leaderboard(
    candidates: list[Candidate], chosen: Pick, shown: list[str], by: Callable[[Candidate], str] = attrgetter("method")
) -> dict[str, dict]:
    """Per method (or per what ``by`` groups by: ``attrgetter("backbone")`` for the backbones' board): its
    candidates counted by status and its best, the first of its candidates in the pick's order (so the overall
    pick is its group's entry); ``best`` None when none completed. Scores are named by the metric they are
    (``best_val_top1``, ``best_val_macro_f1``, …: ``tune.metric``); each best names its backbone and method."""
    metric = chosen.chosen.metric
    board, grouped, first = {}, defaultdict(list), {}
    for c in candidates:
        grouped[by(c)].append(c)
    for c in chosen.order:
        first.setdefault(by(c), c)
    for group in shown:
        mine, best = grouped[group], first.get(group)
        board[group] = {
            "trials": sum(not c.baseline for c in mine),
            "completed": sum(c.status == "completed" for c in mine),
            "stopped_early": sum(c.status == "stopped" for c in mine),
            "cut_by_budget": sum(c.status == "cut" for c in mine),
            "failed": sum(c.status == "failed" for c in mine),
            "best_trial": best.id if best else None,
            "best_backbone": best.backbone if best else None,
            "best_method": best.method if best else None,
            f"best_val_{metric}": best.val_score if best else None,
            **({f"best_cv_{metric}": best.cv_score} if best and best.cv_score is not None else {}),
        }
    return board


def lift(scores: dict[str, float | None], method: str = methods.PROPOSED) -> float | None:
    """``method``'s score minus the best other method's (negative when it lost); None when either is missing."""
    others = [v for m, v in scores.items() if m != method and v is not None]
    mine = scores.get(method)
    return None if mine is None or not others else mine - max(others)


def validation_numbers(
    board: dict[str, dict], metric: str, backbones: dict[str, dict] | None = None
) -> dict[str, float]:
    """The leaderboard as flat numbers (a DVC metrics file, MLflow metrics): per method (and per backbone, as
    ``backbone.<label>.*``, when the search chose one) its best validation ``metric`` and trial counts, and
    DR-Tune's lift over the best other method when both ran (negative when it lost)."""
    out, key = {}, f"best_val_{metric}"
    groups = [(method, e) for method, e in board.items()]
    groups += [(f"backbone.{label}", e) for label, e in (backbones or {}).items()]
    for group, e in groups:
        out |= {
            f"{group}.trials": e["trials"],
            f"{group}.completed": e["completed"],
            f"{group}.stopped_early": e["stopped_early"],
            f"{group}.cut_by_budget": e["cut_by_budget"],
        }
        if e[key] is not None:
            out[f"{group}.{key}"] = e[key]
    val_lift = lift({m: e[key] for m, e in board.items()})
    if val_lift is not None:
        out["drtune_val_lift_over_best_other"] = val_lift
    return out


def tested(board: dict[str, dict], folder: Path, test, known: dict[str, float], metric: str) -> dict[str, dict]:
    """The search's leaderboard with each method's best model tested once on ``test`` (``test_<metric>``);
    ``known`` maps trial ids already tested (the champion candidate) to their test ``metric``."""
    out, key = {}, f"test_{metric}"
    for method, entry in board.items():
        trial, checkpoint = entry["best_trial"], folder / f"{method}.safetensors"
        if trial in known:
            entry = entry | {key: known[trial]}
        elif trial and checkpoint.is_file():
            entry = entry | {key: load_predictor(checkpoint).score(test)[metric]}
        out[method] = entry
    return out


def test_numbers(board: dict[str, dict], metric: str) -> dict[str, float]:
    """Per method its best model's test ``metric``, and DR-Tune's test lift over the best other method (can be
    negative)."""
    key = f"test_{metric}"
    out = {f"{m}.{key}": e[key] for m, e in board.items() if key in e}
    test_lift = lift({m: e.get(key) for m, e in board.items()})
    if test_lift is not None:
        out["drtune_test_lift_over_best_other"] = test_lift
    return out
