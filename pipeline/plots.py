"""The pictures a user looks at first, as PNG files (MLflow artifacts and DVC image plots).

Drawn with matplotlib's Agg backend, so they render offline and on headless machines, unlike
``dvc plots show``'s HTML, which loads its chart library from a CDN.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from drtune.evaluation import METRIC_NAMES


def learning_curves(history: list[dict], path: Path, title: str, metric: str = "top1") -> Path:
    """Validation score (``metric``: ``val_score`` in ``history``) and train/validation loss per epoch of one run."""
    epochs = [h["epoch"] for h in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc.plot(epochs, [h["val_score"] for h in history], marker="o", label=f"validation {METRIC_NAMES[metric]}")
    acc.set(xlabel="epoch", ylabel=METRIC_NAMES[metric], title=title)
    acc.grid(alpha=0.3)
    loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss (CE + λ·R_DR)")
    loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation CE")
    loss.set(xlabel="epoch", ylabel="loss")
    loss.legend()
    loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def search_landscape(rows: list[dict], keys: list[str], path: Path, metric: str = "top1") -> Path:
    """Each searched hyperparameter against the trial's validation score (``val_score``: ``metric``); stopped,
    cut and failed trials marked."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    styles = {
        "completed": ("tab:blue", "o"),
        "stopped": ("tab:gray", "v"),
        "cut": ("tab:orange", "s"),
        "failed": ("tab:red", "x"),
    }
    for ax, key in zip(axes[0], keys, strict=True):
        for status, (color, marker) in styles.items():
            pts = [
                (r[key], r["val_score"] if np.isfinite(r["val_score"]) else 0.0) for r in rows if r["status"] == status
            ]
            if pts:
                shown = {"stopped": "stopped (ASHA)", "cut": "cut (time budget)"}.get(status, status)
                ax.scatter(*zip(*pts, strict=True), c=color, marker=marker, label=shown)
        if key != "queue_size":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=f"validation {METRIC_NAMES[metric]}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells when they fit."""
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_diagram(before: list[dict], after: list[dict], path: Path, title: str) -> Path:
    """Accuracy against confidence per bin (:func:`drtune.temperature.reliability`), before and after
    temperature scaling; a calibrated model lies on the diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for bins, label, marker in ((before, "logits as trained", "o"), (after, "temperature-scaled", "s")):
        used = [b for b in bins if b["n"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker=marker, label=label)
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
