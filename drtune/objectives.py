"""Training objectives: DR-Tune's Eq. 14 and the baselines' regularisers, as plain functions.

* DR-Tune: ``L_CE(batch) + λ · R_DR`` with ``R_DR = −(1/K) Σ_k log softmax(g(v̂_k))[y_k]``.
  The authors' code instead takes one cross-entropy over the B + K concatenated logits, which is
  ``(L_CE + (K/B) R_DR) / (1 + K/B)``; :func:`concatenated_cross_entropy` keeps that form so
  the tests can show the ``reference`` preset takes the same step.
* L2-SP (Li et al., 2018): ``α/2 ‖w − w₀‖²`` over the backbone + ``β/2 ‖w_head‖²``.
* BSS (Chen et al., 2019): ``η Σ σ_i²`` over the k smallest singular values of the batch features.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def dr_tune_loss(
    logits: Tensor, labels: Tensor, bank_logits: Tensor, bank_labels: Tensor, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 14: returns ``(L_CE + λ R_DR, L_CE, R_DR)``."""
    ce = F.cross_entropy(logits, labels)
    reg = F.cross_entropy(bank_logits, bank_labels)
    return ce + lam * reg, ce, reg


def concatenated_cross_entropy(logits: Tensor, labels: Tensor, bank_logits: Tensor, bank_labels: Tensor) -> Tensor:
    """The reference code's loss: one cross-entropy over the B + K rows (= Eq. 14 / (1 + K/B))."""
    return F.cross_entropy(torch.cat([logits, bank_logits]), torch.cat([labels, bank_labels]))


def l2sp_penalty(
    backbone: Iterable[Tensor], start: Iterable[Tensor], head: Iterable[Tensor], alpha: float, beta: float
) -> Tensor:
    """``α/2 Σ ‖w − w₀‖²`` over backbone weights + ``β/2 Σ ‖w‖²`` over head weights."""
    sp = sum(((w - w0) ** 2).sum() for w, w0 in zip(backbone, start, strict=True))
    decay = sum((w**2).sum() for w in head)
    return 0.5 * alpha * sp + 0.5 * beta * decay


def bss_penalty(features: Tensor, eta: float, k: int = 1) -> Tensor:
    """``η Σ σ_i²`` over the ``k`` smallest singular values of the B × D feature matrix."""
    sigma = torch.linalg.svdvals(features.float())
    return eta * (sigma[-k:] ** 2).sum()
