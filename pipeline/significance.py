"""How sure a difference between two models is: on paired per-image results, McNemar's exact test for top-1
and a paired permutation test for balanced accuracy and macro-F1 (``tune.metric``); the Agresti–Caffo interval
when only their scores are known (see :mod:`pipeline.selection`).

The permutation test is McNemar's idea for a score that is not a sum over images: under "equally good"
the two models' predictions of an image are exchangeable, so each image on which they differ swaps
them with probability ½ and the score difference is recomputed (:data:`ROUNDS` draws, seeded: the same
p-value on every machine). Its interval is the paired bootstrap's over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binomtest

from drtune.evaluation import confusion_of, metric_scores

Z95 = 1.959964  # two-sided 95 % normal quantile
ROUNDS = 2000  # permutation and bootstrap draws: a p-value near 0.05 is known to about ± 0.005
TESTS = {"top1": "McNemar"}  # the paired test of each metric; the others use the permutation test


def agresti_caffo(score_a: float, n_a: int, score_b: float, n_b: int) -> tuple[float, float]:
    """95 % interval of ``score_a − score_b`` (independent samples): add one right and one wrong answer to each,
    then the normal interval."""
    pa, pb = (score_a * n_a + 1) / (n_a + 2), (score_b * n_b + 1) / (n_b + 2)
    half = Z95 * math.sqrt(pa * (1 - pa) / (n_a + 2) + pb * (1 - pb) / (n_b + 2))
    return score_a - score_b - half, score_a - score_b + half


@dataclass(frozen=True)
class Comparison:
    """The better of two candidates against the other: the gap, in points and in images, its 95 % interval
    and, when paired, McNemar's p-value (which then decides whether the gap is noise)."""

    best: str
    other: str
    gap: float
    gap_images: float
    low: float
    high: float
    p_value: float | None = None  # paired comparisons only
    test: str = "McNemar"  # the paired test behind p_value

    @property
    def within_noise(self) -> bool:
        return self.p_value >= 0.05 if self.p_value is not None else self.low <= 0.0

    def words(self) -> str:
        how = f"paired, {self.test} p = {self.p_value:.2g}" if self.p_value is not None else "unpaired"
        return (
            f"{self.best} − {self.other}: {self.gap:+.4f} ({self.gap_images:+.1f} images), 95 % interval "
            f"[{self.low:+.4f}, {self.high:+.4f}], {how}" + (", within the noise" if self.within_noise else "")
        )

    def record(self) -> dict:
        return {
            "best": self.best,
            "other": self.other,
            "gap": self.gap,
            "gap_images": self.gap_images,
            "interval": [self.low, self.high],
            "paired": self.p_value is not None,
            "test": self.test if self.p_value is not None else "Agresti-Caffo",
            "p_value": self.p_value,
            "within_noise": self.within_noise,
        }


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same images: how many each alone got right, the difference of their ``metric``
    (a's minus b's), its 95 % interval and the paired test's p-value (McNemar's for top-1)."""

    n: int
    only_a: int  # images a got right and b wrong
    only_b: int
    p_value: float
    metric: str = "top1"
    # balanced accuracy and macro-F1 only: their difference and its bootstrap interval
    score_difference: float | None = None
    bounds: tuple[float, float] | None = field(default=None)

    @property
    def test(self) -> str:
        return TESTS.get(self.metric, "permutation")

    @property
    def difference(self) -> float:
        """a's score minus b's."""
        return (self.only_a - self.only_b) / self.n if self.score_difference is None else self.score_difference

    def interval(self) -> tuple[float, float]:
        """95 % interval of :attr:`difference` (top-1: paired, normal approximation; otherwise the bootstrap's)."""
        if self.bounds is not None:
            return self.bounds
        d = self.difference
        half = Z95 * math.sqrt(max(self.only_a + self.only_b - self.n * d * d, 0.0)) / self.n
        return d - half, d + half

    def record(self) -> dict:
        low, high = self.interval()
        return {
            "n": self.n,
            "metric": self.metric,
            "only_challenger_right": self.only_a,
            "only_baseline_right": self.only_b,
            "difference": self.difference,
            "interval": [low, high],
            "test": self.test,
            "p_value": self.p_value,
        }


def paired_test(a_right: list[bool], b_right: list[bool]) -> PairedTest:
    """McNemar's exact test of two models' per-image correctness on the same images: under "equally good"
    each image only one of them gets right is a fair coin's toss."""
    if len(a_right) != len(b_right) or not len(a_right):
        raise ValueError(f"paired test needs the same, non-empty images: {len(a_right)} and {len(b_right)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a_right, b_right, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a_right, b_right, strict=True))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return PairedTest(len(a_right), only_a, only_b, float(p))


def paired(labels, a_predicted, b_predicted, metric: str, num_classes: int) -> PairedTest:
    """Two models' predictions of the same images compared on ``metric`` (``tune.metric``): McNemar's exact
    test for top-1 (:func:`paired_test`), else the permutation test of the module docstring."""
    labels, a, b = (np.asarray(x, dtype=np.int64) for x in (labels, a_predicted, b_predicted))
    if metric == "top1":
        return paired_test(list(a == labels), list(b == labels))
    if len(a) != len(b) or len(a) != len(labels) or not len(a):
        raise ValueError(f"paired test needs the same, non-empty images: {len(a)} and {len(b)}")

    def score(predicted: np.ndarray, rows: np.ndarray | slice = slice(None)) -> float:
        return metric_scores(confusion_of(labels[rows], predicted[rows], num_classes))[metric]

    difference = score(a) - score(b)
    rng = np.random.default_rng(0)
    differ = np.flatnonzero(a != b)
    extreme = 0
    for _ in range(ROUNDS):
        swap = differ[rng.random(len(differ)) < 0.5]
        a2, b2 = a.copy(), b.copy()
        a2[swap], b2[swap] = b[swap], a[swap]
        extreme += abs(score(a2) - score(b2)) >= abs(difference) - 1e-12
    boot = []
    for _ in range(ROUNDS):
        rows = rng.integers(0, len(labels), len(labels))
        boot.append(score(a, rows) - score(b, rows))
    right_a, right_b = a == labels, b == labels
    return PairedTest(
        n=len(labels),
        only_a=int((right_a & ~right_b).sum()),
        only_b=int((right_b & ~right_a).sum()),
        p_value=(1 + extreme) / (1 + ROUNDS) if len(differ) else 1.0,
        metric=metric,
        score_difference=difference,
        bounds=(float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
    )
