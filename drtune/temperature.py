"""Temperature scaling: calibrated class probabilities from one scalar (Guo et al., ICML 2017).

A fine-tuned classifier is usually over-confident: its top probability exceeds how often it is right.
Dividing the logits by one temperature T > 0 before the softmax changes no prediction (the order of the
logits is kept) and only the confidence. T is fitted on held-out images (the validation split) by
minimising their negative log-likelihood, within [0.05, 20]; T > 1 softens an over-confident model.

Expected calibration error (ECE): the images are put in ``bins`` equal-width bins of their top
probability; ECE is the image-weighted mean, over the bins, of |accuracy − mean confidence|. A
reliability diagram plots the two per bin.
"""

from __future__ import annotations

import numpy as np

BINS = 15  # Guo et al.'s choice


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T in [``low``, ``high``] minimising the mean cross-entropy of ``softmax(logits / T)`` on ``labels``,
    to 4 significant digits (so the same model gives the same T on any machine's last bits).

    The cross-entropy is convex in 1/T (a log-sum-exp of logits scaled by 1/T, minus a linear term), so a
    golden-section search on 1/T over the bounded interval finds the minimum, in float64. Returns 1.0 (no
    change) when the split is empty or every image in it is right: then the loss keeps falling as T → 0,
    and the split says nothing about over-confidence; a temperature from it would make every answer certain.
    """
    if len(labels) == 0 or (np.asarray(logits).argmax(1) == labels).all():
        return 1.0
    z = np.asarray(logits, dtype=np.float64)
    picked = z[np.arange(len(labels)), labels]

    def nll(beta: float) -> float:
        scaled = z * beta
        top = scaled.max(axis=1)
        return float(np.mean(top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)) - beta * picked))

    a, b = 1.0 / high, 1.0 / low
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(80):  # the interval shrinks by 0.618 per step: 80 steps reach float64 resolution
        if nll(c) < nll(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    beta = (a + b) / 2.0
    if not np.isfinite(beta) or nll(beta) >= nll(1.0):
        return 1.0
    return float(f"{1.0 / beta:.4g}")


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` per row, float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(proba: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin ``[lo, hi)`` (the last one closed): images, mean confidence, accuracy."""
    confidence, right = proba.max(axis=1), proba.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "n": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()) if (which == b).any() else float("nan"),
            "accuracy": float(right[which == b].mean()) if (which == b).any() else float("nan"),
        }
        for b in range(bins)
    ]


def calibration_error(bins: list[dict]) -> float:
    """ECE from :func:`reliability`'s bins (see the module docstring); 0.0 for no images."""
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])) if n else 0.0


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """ECE of ``proba`` on ``labels`` (see the module docstring); 0.0 for no images."""
    return calibration_error(reliability(proba, labels, bins))
