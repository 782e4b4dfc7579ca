"""How sure a difference between two models is: McNemar's exact test on paired per-image results, and
the Agresti–Caffo interval when only their scores are known (see :mod:`pipeline.selection`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import binomtest

Z95 = 1.959964  # two-sided 95 % normal quantile


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

    @property
    def within_noise(self) -> bool:
        return self.p_value >= 0.05 if self.p_value is not None else self.low <= 0.0

    def words(self) -> str:
        how = f"paired, McNemar p = {self.p_value:.2g}" if self.p_value is not None else "unpaired"
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
            "mcnemar_p": self.p_value,
            "within_noise": self.within_noise,
        }


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same test images: how many each alone got right, and McNemar's exact p-value."""

    n: int
    only_a: int  # images a got right and b wrong
    only_b: int
    p_value: float

    @property
    def difference(self) -> float:
        """a's top-1 minus b's."""
        return (self.only_a - self.only_b) / self.n

    def interval(self) -> tuple[float, float]:
        """95 % interval of :attr:`difference` (paired, normal approximation)."""
        d = self.difference
        half = Z95 * math.sqrt(max(self.only_a + self.only_b - self.n * d * d, 0.0)) / self.n
        return d - half, d + half

    def record(self) -> dict:
        low, high = self.interval()
        return {
            "n": self.n,
            "only_challenger_right": self.only_a,
            "only_baseline_right": self.only_b,
            "difference": self.difference,
            "interval": [low, high],
            "mcnemar_p": self.p_value,
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
