"""Scoring a trained model on the held-out test split: top-1, top-5 and the confusion matrix."""

from __future__ import annotations

import numpy as np

from drtune.data import ArraySplit


def score(proba: np.ndarray, split: ArraySplit) -> dict:
    """Accuracy figures and the confusion matrix (rows: true class) of predicted probabilities."""
    labels = split.labels
    top = np.argsort(-proba, axis=1)[:, : min(5, proba.shape[1])]
    n = proba.shape[1]
    confusion = np.bincount(labels * n + top[:, 0], minlength=n * n).reshape(n, n)
    return {"top1": float((top[:, 0] == labels).mean()), "top5": float((top == labels[:, None]).any(1).mean()),
            "n": len(labels), "confusion": confusion, "predicted": top[:, 0]}
