"""The authors' semantic calibration, written as they wrote it: the executable specification.

A per-class Python loop and a full ``D × D`` SVD, exactly the algorithm of the DR-Tune reference
code (with its one-entry-class bug fixed: such a class moves onto its downstream feature). The
tests check :func:`drtune.calibration.semantic_calibrate` against it and ``bench/calibration.py``
times both. Not used in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def reference_semantic_calibrate(
    pre_bank: Tensor,
    down_bank: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    scale: float | Tensor,
    *,
    rotate: bool = True,
    translate: bool = True,
    confidence: bool = True,
) -> Tensor:
    """Reference calibration; same arguments and result as :func:`semantic_calibrate`."""
    pre = F.normalize(pre_bank, dim=1)
    down = F.normalize(down_bank, dim=1)
    if rotate:
        pre_c = pre - pre.mean(dim=0)
        down_c = down - down.mean(dim=0)
        u, _, vh = torch.linalg.svd(pre_c.T @ down_c)
        v = vh.T
        fix = torch.eye(u.shape[0], dtype=pre.dtype)
        fix[-1, -1] = torch.sign(torch.det(v @ u.T))
        rotation = v @ fix @ u.T
        pre = (rotation @ pre_c.T).T
    if translate:
        out = pre.clone()
        w_norm = F.normalize(head_weight, dim=1)
        for c in torch.unique(labels).tolist():
            idx = (labels == c).nonzero(as_tuple=True)[0]
            d_c = down[idx]
            if confidence:
                weights = torch.softmax(d_c @ w_norm[c], dim=0)
            else:
                weights = torch.full((len(idx),), 1.0 / len(idx), dtype=pre.dtype)
            mu_d = (weights.unsqueeze(1) * d_c).sum(dim=0)
            out[idx] = pre[idx] + (mu_d - pre[idx].mean(dim=0))
        pre = out
    return F.normalize(pre, dim=1) * scale
