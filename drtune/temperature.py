"""Temperature scaling: calibrated class probabilities from one scalar (Guo et al., ICML 2017).

A fine-tuned classifier is usually over-confident: its top probability exceeds how often it is right.
Dividing the logits by one temperature T > 0 before the softmax changes no prediction (the order of the
logits is kept) and only the confidence. T is fitted on held-out images (the validation split) by
minimising their negative log-likelihood; T > 1 softens an over-confident model.

Expected calibration error (ECE): the images are put in ``bins`` equal-width bins of their top
probability; ECE is the image-weighted mean, over the bins, of |accuracy − mean confidence|. A
reliability diagram plots the two per bin.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 15  # Guo et al.'s choice


def fit_temperature(logits: np.ndarray, labels: np.ndarray, steps: int = 100) -> float:
    """The T > 0 minimising the mean cross-entropy of ``softmax(logits / T)`` on ``labels`` (float64 L-BFGS on
    log T, from T = 1, so T stays positive). Returns 1.0 for an empty split."""
    if len(labels) == 0:
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


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


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """ECE (see the module docstring); 0.0 for no images."""
    n = len(labels)
    return (
        float(
            sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(proba, labels, bins) if b["n"])
        )
        if n
        else 0.0
    )
