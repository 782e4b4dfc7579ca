"""Choosing the model: rank the candidates, pick one knowing the validation noise, and the paired
test that gates promotion (the per-method leaderboard is :mod:`pipeline.leaderboard`). No Ray: the search, the ``tune`` and
``register`` stages and the benchmarks all call this one module.

**Candidates** are the search's trials and the CE baseline (plain fine-tuning at the defaults,
trained on the same splits for the same epochs). Only candidates that ran every epoch are ranked: a
stopped trial's score comes from a shorter schedule and its checkpoint is not a finished model.

**Noise.** A few-label validation split is small (Fashion-MNIST at 60 labels per class keeps 120
images: one image is 0.83 points), so two candidates a few images apart are not told apart by it.
Candidates are scored on the *same* images, so the comparison is paired, image by image, as the
test gate's is: only the images one of the two gets right and the other wrong carry information,
and under "equally good" each is a fair coin's toss (McNemar's exact test). Two candidates are
*within the noise* when that test's two-sided p-value is 0.05 or more. Pairing matters: two models
that agree on most images are told apart by a gap that two independent samples would not resolve.

With ``tune.metric`` balanced accuracy or macro-F1 the score is that metric and the paired test is a
permutation test on the two models' predictions (:mod:`pipeline.significance`), which McNemar's is the
top-1 case of.

Per-image results are known only for the candidates given them (:meth:`Candidate.with_outcomes`; the stage
gets them for the candidates near the top, and for every completed candidate when ``tune.metric`` is not
top-1). Otherwise the comparison falls back to the unpaired 95 % interval of Agresti–Caffo (add one right
and one wrong answer to each, then the normal interval), which for top-1 is wider, so it calls a tie more
often, never less::

    p̃ = (k + 1) / (n + 2)       gap ± 1.96 · sqrt(p̃₁(1 − p̃₁)/(n₁ + 2) + p̃₂(1 − p̃₂)/(n₂ + 2))

**The pick** (:func:`pick`):

1. Rank by score (validation ``tune.metric``; once a candidate was re-validated, the mean over all folds for
   top-1, the metric over the pooled images of all folds for the others),
   ties by lower validation loss, then the given order.
2. *Clear*: the best is outside the noise of every other candidate: it wins.
3. Otherwise the tied candidates are re-validated on more held-out folds of the same labels
   (:func:`finalists`, run by the ``tune`` stage) and ranked again among themselves on the pooled
   folds; a clear best there wins.
4. *Conservative rule*, when they are still tied or re-validation is off: plain fine-tuning (the
   CE baseline) wins if it is among the tied; otherwise the top score stands.

**The gate** (:func:`pipeline.significance.paired`): on the test split, once, the challenger against the CE baseline
image by image (McNemar's exact test; the permutation test for another ``tune.metric``). Test images never choose
among candidates; they only decide whether the chosen one may become champion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from drtune.evaluation import confusion_of, metric_scores
from pipeline.significance import Comparison, agresti_caffo, paired

BASELINE = "baseline"  # the CE baseline's candidate id


@dataclass(frozen=True)
class Outcomes:
    """Per held-out image behind a score: its true class and the model's prediction (in the split's order)."""

    labels: tuple[int, ...]
    predicted: tuple[int, ...]
    num_classes: int

    def __add__(self, other: Outcomes) -> Outcomes:
        """These images, then ``other``'s (a candidate's validation split, then its extra folds)."""
        return Outcomes(self.labels + other.labels, self.predicted + other.predicted, self.num_classes)

    def __len__(self) -> int:
        return len(self.labels)

    def score(self, metric: str) -> float:
        """``metric`` (top1, balanced_accuracy, macro_f1) over these images."""
        return metric_scores(confusion_of(self.labels, self.predicted, self.num_classes))[metric]


@dataclass(frozen=True)
class Candidate:
    """One model the pick may choose: a search trial or the CE baseline.

    ``config`` holds the sampled values that retrain it (``{"method": "ce"}`` for the baseline, whose
    values are the config's own); ``ref`` is where its model is (a Ray checkpoint, a file), opaque here.
    """

    id: str
    method: str
    val_score: float  # validation ``metric``
    val_loss: float
    n_val: int
    status: str = "completed"  # completed | stopped (by ASHA) | cut (by the time budget) | failed
    config: dict = field(default_factory=dict)
    baseline: bool = False
    cv_score: float | None = None  # ``metric`` over its own split and the extra folds, once re-validated
    folds: int = 1  # held-out splits pooled in its score
    ref: Any = None
    outcomes: Outcomes | None = None  # per image behind its score: validation, then each extra fold in order
    metric: str = "top1"  # tune.metric: what the scores are
    backbone: str = ""  # the label of the backbone it fine-tuned (tune.models, else model.*'s)

    @property
    def score(self) -> float:
        return self.cv_score if self.cv_score is not None else self.val_score

    @property
    def n(self) -> int:
        """Held-out images behind :attr:`score`."""
        return self.n_val * self.folds

    def revalidated(self, fold_scores: list[float], fold_outcomes: list[Outcomes] | None = None) -> Candidate:
        """This candidate with ``fold_scores`` (its score on each extra fold, each of ``n_val`` images) pooled in,
        and ``fold_outcomes`` (each fold in order) appended to its validation outcomes when both are known."""
        scores = [self.val_score, *fold_scores]
        cv_score, outcomes = sum(scores) / len(scores), self.outcomes
        if outcomes is not None and fold_outcomes is not None:
            for fold in fold_outcomes:
                outcomes = outcomes + fold
            if self.metric != "top1":  # not a mean over images: scored on the pooled images, as compare() tests it
                cv_score = outcomes.score(self.metric)
        else:
            outcomes = None
        return replace(self, cv_score=cv_score, folds=len(scores), outcomes=outcomes)

    def with_outcomes(self, outcomes: Outcomes) -> Candidate:
        """This candidate with its per-image results on the validation split."""
        return replace(self, outcomes=outcomes)


def compare(a: Candidate, b: Candidate) -> Comparison:
    """``a`` against ``b``: paired on their per-image results when both have them for the same images,
    else on their scores (Agresti–Caffo); see the module docstring."""
    if a.outcomes is not None and b.outcomes is not None and a.outcomes.labels == b.outcomes.labels:
        t = paired(a.outcomes.labels, a.outcomes.predicted, b.outcomes.predicted, a.metric, a.outcomes.num_classes)
        low, high = t.interval()
        # in images: exact for top-1 (only a right minus only b right), the score's gap × images otherwise
        return Comparison(a.id, b.id, t.difference, t.difference * t.n, low, high, t.p_value, t.test)

    gap = a.score - b.score
    low, high = agresti_caffo(a.score, a.n, b.score, b.n)
    return Comparison(a.id, b.id, gap, gap * min(a.n, b.n), low, high)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Completed candidates, best first: higher score, then lower validation loss, then the given order."""
    done = [c for c in candidates if c.status == "completed" and math.isfinite(c.score)]
    return sorted(done, key=lambda c: (-c.score, c.val_loss))


def tied_with_best(ranked: list[Candidate]) -> list[Candidate]:
    """The candidates of ``ranked`` (best first) that the best is not clearly better than, the best included."""
    return [c for c in ranked if c is ranked[0] or compare(ranked[0], c).within_noise]


def finalists(candidates: list[Candidate], at_most: int) -> list[Candidate]:
    """Whom to re-validate: the candidates tied with the best on validation, at most ``at_most`` in rank
    order, the baseline kept among them when it is tied (the conservative rule needs it). Empty when
    the best is clear."""
    tied = tied_with_best(rank(candidates))
    if len(tied) < 2:
        return []
    chosen = tied[:at_most]
    base = next((c for c in tied if c.baseline), None)
    if base is not None and base not in chosen:
        chosen = chosen[: at_most - 1] + [base]
    return chosen


@dataclass(frozen=True)
class Pick:
    """The chosen candidate, why, and every candidate in selection order (the chosen first)."""

    chosen: Candidate
    rule: str  # clear | revalidated | conservative
    reason: str
    comparison: Comparison | None  # the best two in the deciding round (None with a single candidate)
    tied: list[str]
    order: list[Candidate]

    def record(self) -> dict:
        """What ``models/best.json``, the parent run and the registered version state about the decision."""
        return {
            "chosen": self.chosen.id,
            "method": self.chosen.method,
            "rule": self.rule,
            "reason": self.reason,
            "tied": self.tied,
            "scored_on_images": self.chosen.n,
            "comparison": self.comparison.record() if self.comparison else None,
        }


def pick(candidates: list[Candidate]) -> Pick:
    """The pick of the module docstring. Candidates with ``cv_score`` were re-validated: when there are
    any, the deciding round is among them alone (the others were already clearly behind on validation)."""
    everyone = rank(candidates)
    if not everyone:
        raise ValueError("no candidate completed its schedule")
    scoped = [c for c in everyone if c.cv_score is not None] or everyone
    again = scoped is not everyone
    tied = tied_with_best(scoped)
    comparison = compare(scoped[0], scoped[1]) if len(scoped) > 1 else None
    where = (
        f"on {scoped[0].folds} held-out folds ({scoped[0].n} images)"
        if again
        else f"on validation ({scoped[0].n} images)"
    )
    if len(tied) == 1:
        chosen, rule = scoped[0], "revalidated" if again else "clear"
        reason = f"{chosen.id} is best {where}" + (
            f", clear of the runner-up: {comparison.words()}" if comparison else ""
        )
    else:
        base = next((c for c in tied if c.baseline), None)
        chosen, rule = base or tied[0], "conservative"
        names = ", ".join(c.id for c in tied)
        reason = f"{len(tied)} candidates are within the noise {where} ({names}; {comparison.words()}): " + (
            "plain fine-tuning (the CE baseline) is among them and wins the tie"
            if base
            else "the CE baseline is not among them, so the top score stands"
        )
    rest = [c for c in scoped if c is not chosen] + [c for c in everyone if c not in scoped]
    return Pick(chosen, rule, reason, comparison, [c.id for c in tied], [chosen, *rest])
