"""Self-supervised objectives for continued pretraining on unlabelled images: MoCo v2 and SimCLR.

The objectives, projection heads and two-view augmentations are lightly's (``lightly`` on PyPI);
this module only assembles them around a timm backbone, so the backbone that leaves pretraining
has exactly the key layout fine-tuning loads.

* **MoCo v2** (Chen, Fan, Girshick & He, 2020; the paper's MoCo backbones). A query encoder
  ``f_q`` = backbone + 2-layer MLP head (hidden 2048, ReLU, output 128) and a key encoder ``f_k``,
  its exponential moving average (``pretrain.ema``; MoCo's 0.999 suits 800 epochs, 0.99 a few).
  InfoNCE at temperature 0.2 between each query and its key, against a queue of the last
  ``pretrain.queue_size`` keys: lightly's ``NTXentLoss`` with a memory bank, which gathers the keys
  of every rank before they are queued. The loss is symmetrised (each view is once the query) in
  one call, so both views' queries meet the queue as it was before the step, and the step's 2B
  keys are queued after it (two calls would queue ``k1`` before ``q1`` meets it: its own key as a
  negative). Shuffling BN (MoCo's 8-GPU trick): BatchNorm statistics of a batch would let a query
  find its key through them, so the key encoder sees the batch in another grouping than the query
  encoder: under DDP the keys are shuffled across ranks; in one process the batch is encoded as
  ``SPLITS`` sub-batches, the queries in order and the keys shuffled, as if on that many GPUs.
* **SimCLR** (Chen et al., 2020). One encoder + MLP head with BN (hidden 2048, output 128);
  NT-Xent at temperature 0.5 over the 2N views of the global batch (gathered across ranks).

:class:`Contrastive` is one ``nn.Module``: ``forward(view0, view1)`` returns the loss, so a DDP
wrapper all-reduces its gradients as it does for fine-tuning. :meth:`Contrastive.after_step`
moves MoCo's key encoder after each optimiser step.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import (
    batch_shuffle,
    batch_shuffle_distributed,
    batch_unshuffle,
    batch_unshuffle_distributed,
    update_momentum,
)
from lightly.transforms import MoCoV2Transform, SimCLRTransform
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

METHODS = ("moco", "simclr")
DEFAULT_TEMPERATURE = {"moco": 0.2, "simclr": 0.5}  # the two papers' values
HIDDEN_DIM = 2048  # both papers' MLP width
SPLITS = 2  # one process: sub-batches with their own BatchNorm statistics (Shuffling BN), as on 2 GPUs


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Contrastive(nn.Module):
    """A backbone trained by MoCo v2 or SimCLR; ``backbone`` is a timm model with ``num_classes=0``."""

    def __init__(
        self,
        backbone: nn.Module,
        method: str,
        *,
        projection_dim: int = 128,
        temperature: float | None = None,
        queue_size: int = 4096,
        ema: float = 0.99,
    ) -> None:
        super().__init__()
        self.method, self.ema = method, ema
        dim = backbone.num_features
        self.backbone = backbone
        temperature = temperature or DEFAULT_TEMPERATURE[method]
        gather = _distributed()
        if method == "moco":
            self.head = MoCoProjectionHead(dim, HIDDEN_DIM, projection_dim)
            self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)
            self.criterion = NTXentLoss(
                temperature=temperature, memory_bank_size=(queue_size, projection_dim), gather_distributed=gather
            )
        else:
            self.head = SimCLRProjectionHead(dim, HIDDEN_DIM, projection_dim)
            self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather)

    @staticmethod
    def _splits(x: Tensor) -> int:
        """Sub-batches of Shuffling BN in one process (1 under DDP, where the ranks are the groups)."""
        return 1 if _distributed() or len(x) < 2 * SPLITS else SPLITS

    def _query(self, x: Tensor) -> Tensor:
        """MoCo's query projections of ``x``, each sub-batch with its own BatchNorm statistics."""
        return torch.cat([self.head(self.backbone(part)) for part in x.chunk(self._splits(x))])

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        """MoCo's key projections of ``x``, computed on a shuffled batch (Shuffling BN)."""
        if _distributed():
            shuffled, order = batch_shuffle_distributed(x)
            return batch_unshuffle_distributed(self.key_head(self.key_backbone(shuffled)), order)
        shuffled, order = batch_shuffle(x)
        keys = torch.cat([self.key_head(self.key_backbone(part)) for part in shuffled.chunk(self._splits(x))])
        return batch_unshuffle(keys, order)

    def forward(self, view0: Tensor, view1: Tensor) -> Tensor:
        """The batch's self-supervised loss (a scalar)."""
        if self.method == "moco":
            queries = torch.cat([self._query(view0), self._query(view1)])
            keys = torch.cat([self._key(view1), self._key(view0)])  # each query's positive: the other view's key
            return self.criterion(queries, keys)
        return self.criterion(self.head(self.backbone(view0)), self.head(self.backbone(view1)))

    def get_extra_state(self) -> dict:
        """MoCo's queue and its write pointer, which lightly keeps out of the state dict (non-persistent
        buffers); an exact resume needs them, so they travel as the module's extra state."""
        if self.method != "moco":
            return {}
        bank = self.criterion.memory_bank
        return {"queue": bank.bank.clone(), "pointer": bank.bank_ptr.clone()}

    def set_extra_state(self, state: dict) -> None:
        if state:
            bank = self.criterion.memory_bank
            bank.bank.copy_(state["queue"])
            bank.bank_ptr.copy_(state["pointer"])

    @torch.no_grad()
    def after_step(self) -> None:
        """MoCo: move the key encoder towards the query encoder (``θ_k ← m θ_k + (1 − m) θ_q``)."""
        if self.method == "moco":
            update_momentum(self.backbone, self.key_backbone, self.ema)
            update_momentum(self.head, self.key_head, self.ema)


def two_views(method: str, image_size: int, data_cfg: dict):
    """lightly's augmentation for ``method`` at ``image_size``, normalised with the backbone's mean and std:
    a callable from a PIL image to ``[view0, view1]``."""
    normalize = {"mean": list(data_cfg["mean"]), "std": list(data_cfg["std"])}
    if method == "moco":
        return MoCoV2Transform(input_size=image_size, normalize=normalize)
    return SimCLRTransform(input_size=image_size, normalize=normalize)


class TwoViewDataset(Dataset):
    """Unlabelled uint8 images (N × H × W × C, C = 1 or 3) served as two augmented views each."""

    def __init__(self, images: np.ndarray, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.images[i]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
        view0, view1 = self.transform(pil)
        return view0, view1
