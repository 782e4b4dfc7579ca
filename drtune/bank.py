"""FIFO feature banks: the K (pretrained feature, downstream feature, label) slots DR-Tune regularises with.

Rows are stored L2-normalised (semantic calibration normalises them anyway, so doing it once per
enqueued row instead of once per bank row per step saves two K × D passes every step). Any K is
accepted: writes wrap around the end of the bank. Under ``torch.distributed`` each rank
all-gathers the global batch before writing, so every rank holds the same bank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank in rank order (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class FeatureBank(nn.Module):
    """K slots of normalised pretrained features, normalised downstream features and labels.

    The buffers are part of ``state_dict``, so a checkpoint restores the bank and its write
    pointer exactly.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("pre", torch.zeros(size, dim))
        self.register_buffer("down", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def full(self) -> bool:
        """Every slot has been written at least once."""
        return int(self.count) >= self.size

    @torch.no_grad()
    def enqueue(self, pre: Tensor, down: Tensor, labels: Tensor) -> None:
        """Write a batch (gathered from all ranks) at the pointer, oldest rows first out."""
        pre, down, labels = _all_gather(pre.detach()), _all_gather(down.detach()), _all_gather(labels)
        if len(labels) > self.size:  # a batch larger than the bank: only its last K rows survive
            pre, down, labels = pre[-self.size :], down[-self.size :], labels[-self.size :]
        n = len(labels)
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.pre[idx] = F.normalize(pre.float(), dim=1)
        self.down[idx] = F.normalize(down.float(), dim=1)
        self.labels[idx] = labels
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.add_(n)
