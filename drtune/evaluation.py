"""Scoring a classifier on a split: the one evaluation function of the project.

Validation during training, the final test of the CLI, the pipeline's test of the registered model
and the benchmarks all call :func:`evaluate`, so a top-1 means the same thing everywhere: the
model in eval mode on the evaluation transform (resize + centre crop), logits in float32.

Which model is tested is one rule too: the model after the **last** epoch. The learning rate is
annealed to 0 over ``train.epochs``, so the last epoch is the finished model, and it is the one a
resumed run restores and the search selects trials by (final-epoch validation). Picking the best
epoch on validation instead would choose on a split of about a hundred images (one image ≈ 1 point)
and report a maximum over noisy epochs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

METRIC_NAMES = {"top1": "top-1", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1"}  # tune.metric


def _class_rates(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per class of a C × C confusion matrix (rows: true class): images right, its support (true), how often it
    was predicted, and precision, recall and F1 (0 where undefined)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    right, true, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    zero = np.zeros_like(right)
    return {
        "right": right,
        "true": true,
        "predicted": predicted,
        "precision": np.divide(right, predicted, out=zero.copy(), where=predicted > 0),
        "recall": np.divide(right, true, out=zero.copy(), where=true > 0),
        "f1": np.divide(2 * right, true + predicted, out=zero.copy(), where=(true + predicted) > 0),
    }


def metric_scores(confusion: np.ndarray) -> dict[str, float]:
    """Top-1, balanced accuracy and macro-F1 from a C × C confusion matrix (rows: true class), as
    scikit-learn defines them: balanced accuracy is the mean recall over the classes present in the
    split; macro-F1 the mean F1 over the classes present in the split or the predictions, an undefined
    F1 (nothing predicted and nothing true) counting 0. With balanced classes the first two are equal."""
    r = _class_rates(confusion)
    present, seen = r["true"] > 0, (r["true"] + r["predicted"]) > 0
    return {
        "top1": float(r["right"].sum() / max(r["true"].sum(), 1.0)),
        "balanced_accuracy": float(r["recall"][present].mean()) if present.any() else 0.0,
        "macro_f1": float(r["f1"][seen].mean()) if seen.any() else 0.0,
    }


def confusion_of(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """C × C counts of (true, predicted) pairs, rows: true class."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class(confusion: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of every class: the table ``register`` logs with the test score."""
    r = _class_rates(confusion)
    return [
        {"class": name, "precision": float(p), "recall": float(rec), "f1": float(f), "support": int(t)}
        for name, p, rec, f, t in zip(classes, r["precision"], r["recall"], r["f1"], r["true"], strict=True)
    ]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, predictions: bool = False) -> dict:
    """Top-1, top-5 accuracy, mean cross-entropy, the count ``n``, balanced accuracy and macro-F1
    (:func:`metric_scores`), over all ranks.

    With ``predictions`` (single process only) the result also holds ``predicted`` (top-1 class
    per image, in loader order), ``confusion`` (C × C counts, rows: true class) and ``logits`` (N × C,
    float32; the probabilities' calibration is fitted and measured on them, :mod:`drtune.temperature`).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, n
    confusion = None  # C × C counts, summed over ranks like ``sums`` (C is known at the first batch)
    predicted, labels, all_logits = [], [], []
    for x, y, *_ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack(
            [
                (top[:, 0] == y).sum().double(),
                (top == y[:, None]).any(1).sum().double(),
                F.cross_entropy(logits, y, reduction="sum").double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
        num_classes = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
        confusion += torch.bincount(y * num_classes + top[:, 0], minlength=num_classes**2).double()
        if predictions:
            predicted.append(top[:, 0].cpu())
            labels.append(y.cpu())
            all_logits.append(logits.cpu())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(confusion)  # every rank has seen a batch: the split is padded to the world size
    n = max(sums[3].item(), 1.0)
    out = {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n, "n": int(sums[3].item())}
    if confusion is not None:
        counts = confusion.cpu().numpy().round().astype(np.int64).reshape(num_classes, num_classes)
        out |= {k: v for k, v in metric_scores(counts).items() if k != "top1"}
        if predictions:
            out["confusion"] = counts
    if predictions and predicted:
        out["predicted"] = torch.cat(predicted).numpy()
        out["logits"] = torch.cat(all_logits).numpy()
    return out
