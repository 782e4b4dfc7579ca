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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, predictions: bool = False) -> dict:
    """Top-1, top-5 accuracy, mean cross-entropy and the count ``n``, summed over all ranks.

    With ``predictions`` (single process only) the result also holds ``predicted`` (top-1 class
    per image, in loader order), ``confusion`` (C × C counts, rows: true class) and ``logits`` (N × C,
    float32; the probabilities' calibration is fitted and measured on them, :mod:`drtune.temperature`).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss, n
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
        if predictions:
            predicted.append(top[:, 0].cpu())
            labels.append(y.cpu())
            all_logits.append(logits.cpu())
            num_classes = logits.shape[1]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1.0)
    out = {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n, "n": int(sums[3].item())}
    if predictions and predicted:
        pred, true = torch.cat(predicted).numpy(), torch.cat(labels).numpy()
        out["predicted"] = pred
        out["logits"] = torch.cat(all_logits).numpy()
        out["confusion"] = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, -1)
    return out
