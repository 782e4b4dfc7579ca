"""The fine-tuning task: a trainable encoder + head, a frozen pretrained encoder and the banks, as one module.

One training step of DR-Tune (paper Sec. 3, Alg. 1) reads, top to bottom, in :meth:`FineTuneTask.step`:

1. ``z_d = f_d(x)``, ``logits = g(z_d)`` — the trainable classifier (the only DDP-wrapped part);
2. ``z_p = f_p(x)`` — the frozen pretrained encoder on the *same* augmented images (eval, no grad);
   with ``cached_features`` it is looked up instead: ``f_p`` of the un-augmented image, computed
   once before training (:meth:`FineTuneTask.cache_pretrained_features`), which removes the one
   extra forward pass DR-Tune adds to a CE-tuning step;
3. ``v̂ = SC(M_p, M_d, y_bank)`` — semantic calibration of the bank as it was *before* this batch;
4. ``loss = CE(logits, y) + λ · CE(g(v̂), y_bank)`` — DR gradients reach only the head, since
   ``v̂`` is a constant;
5. after the optimiser step, ``(z_p, z_d, y)`` are enqueued (:meth:`FineTuneTask.after_step`).

The baselines share the same step with a different regulariser: ``ce`` (none), ``linear_probe``
(frozen backbone), ``l2sp`` and ``bss`` (see :mod:`drtune.objectives`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from drtune.bank import FeatureBank
from drtune.calibration import procrustes_rotation_matrix, semantic_calibrate
from drtune.objectives import bss_penalty, dr_tune_loss, l2sp_penalty

Method = Literal["drtune", "ce", "linear_probe", "l2sp", "bss"]


@dataclass(frozen=True)
class TaskSettings:
    """The method and its regulariser's hyperparameters (validated by :mod:`drtune.config`)."""

    method: Method = "drtune"
    lam: float = 1.0  # λ in Eq. 14: weight of R_DR, independent of K
    queue_size: int = 1024  # K: bank slots
    dr: bool = True  # distribution regularisation on/off (off = CE-tuning + a frozen copy)
    sc: bool = True  # semantic calibration on/off
    rotate: bool = True  # SC part: global rotation
    translate: bool = True  # SC part: class-level translation
    confidence: bool = True  # SC part: confidence-weighted downstream class centres
    rotation_every: int = 10  # recompute the rotation every N steps (10 = reference)
    rotation_between: Literal["skip", "reuse"] = "skip"  # steps in between: no rotation | last one
    cached_features: bool = False  # z_p from a per-image cache of un-augmented features, not f_p(x)
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    bss_eta: float = 0.001
    bss_k: int = 1


class Classifier(nn.Module):
    """Downstream encoder + linear head: the inference model, and the only part wrapped by DDP.

    ``forward(x)`` returns logits; training asks for the pooled features too. The DR head pass
    on the calibrated bank happens outside this forward (it needs the batch's feature norm):
    autograd sums both head gradients before DDP's hook sees them, so they are all-reduced once.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, num_classes)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features = self.encoder(x)
        logits = self.head(features)
        return (features, logits) if return_features else logits


class FineTuneTask(nn.Module):
    """Everything one fine-tuning run trains or carries: classifier, frozen encoder, banks."""

    def __init__(self, backbone: nn.Module, num_classes: int, settings: TaskSettings) -> None:
        super().__init__()
        self.settings = settings
        needs_frozen = settings.method in ("drtune", "l2sp")
        # The frozen encoder is a deep copy of the pretrained backbone taken before any update:
        # DR-Tune's f_p, and L2-SP's starting point w₀.
        self.frozen = copy.deepcopy(backbone).eval().requires_grad_(False) if needs_frozen else None
        self.model = Classifier(backbone, num_classes)
        self.bank = FeatureBank(settings.queue_size, backbone.num_features) if settings.method == "drtune" else None
        if settings.method == "linear_probe":
            backbone.requires_grad_(False)
        if self.bank is not None and settings.rotation_between == "reuse":
            # The last rotation, applied between recomputations; in the checkpoint with the banks.
            self.register_buffer("rotation", torch.zeros(backbone.num_features, backbone.num_features))
            self.register_buffer("has_rotation", torch.zeros((), dtype=torch.bool))
        else:
            self.rotation = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Not a buffer: a deterministic function of the frozen encoder and the training split,
        # rebuilt on resume rather than stored in every checkpoint.
        self.feature_cache: Tensor | None = None
        self._calibrated: Tensor | None = None  # reused output of SC: no fresh K × D tensor per step
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def train(self, mode: bool = True) -> FineTuneTask:
        """Train mode for the trainable parts; the frozen encoder, and a probed backbone, stay in eval."""
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        if self.settings.method == "linear_probe":
            self.model.encoder.eval()
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters) — they get separate learning rates."""
        backbone = [p for p in self.model.encoder.parameters() if p.requires_grad]
        return backbone, list(self.model.head.parameters())

    def _calibrated_bank(self, batch_down: Tensor) -> Tensor:
        """Step 3: the bank's pretrained features, calibrated (or only normalised and scaled)."""
        s, bank = self.settings, self.bank
        scale = batch_down.detach().norm(dim=1).mean()
        if not s.sc:
            return bank.pre * scale
        rotating = s.rotate and s.rotation_every > 0
        due = rotating and int(self.steps) % s.rotation_every == 0
        rotation = None
        if rotating and self.rotation is not None:
            if due or not bool(self.has_rotation):
                self.rotation.copy_(procrustes_rotation_matrix(bank.pre, bank.down))
                self.has_rotation.fill_(True)
            rotation = self.rotation
        if self._calibrated is None or self._calibrated.device != bank.pre.device:
            self._calibrated = torch.empty_like(bank.pre)
        # The previous step's backward, which read this buffer, has already run.
        return semantic_calibrate(
            bank.pre, bank.down, bank.labels, self.model.head.weight.detach(), scale,
            rotate=(due or rotation is not None), translate=s.translate, confidence=s.confidence,
            normalized=True, rotation=rotation, out=self._calibrated,
        )

    @torch.no_grad()
    def cache_pretrained_features(self, loader, device: torch.device) -> int:
        """Fill :attr:`feature_cache` with ``f_p`` of every image ``loader`` yields as ``(x, y, index)``.

        ``loader`` should apply the evaluation transform (no augmentation) and cover the training
        split once; row ``i`` of the cache is image ``i``. Returns the number of rows.
        """
        cache = torch.zeros(len(loader.dataset), self.model.encoder.num_features, device=device)
        for x, _, index in loader:
            cache[index.to(device)] = self.frozen(x.to(device)).float()
        self.feature_cache = cache
        return len(cache)

    def _pretrained_features(self, x: Tensor, index: Tensor | None) -> Tensor:
        """``z_p`` of a batch: the frozen encoder on ``x``, or the cached rows of ``index``."""
        if self.settings.cached_features:
            if self.feature_cache is None or index is None:
                raise RuntimeError("cached_features needs cache_pretrained_features() and each batch's index")
            return self.feature_cache[index.to(self.feature_cache.device)]
        with torch.no_grad():
            return self.frozen(x)

    def step(self, model: nn.Module, x: Tensor, y: Tensor, index: Tensor | None = None) -> dict[str, Tensor]:
        """Forward and loss for one batch. ``model`` is ``self.model`` or its DDP wrapper; ``index``
        (the images' positions in the training split) is needed only with cached features."""
        s = self.settings
        features, logits = model(x, return_features=True)
        loss = ce = nn.functional.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"logits": logits, "ce": ce}
        if s.method == "drtune":
            z_p = self._pretrained_features(x, index)
            if s.dr:
                calibrated = self._calibrated_bank(features)
                loss, _, out["reg"] = dr_tune_loss(logits, y, self.model.head(calibrated), self.bank.labels, s.lam)
            self._pending = (z_p, features.detach(), y)
        elif s.method == "l2sp":
            out["reg"] = l2sp_penalty(
                self.model.encoder.parameters(), self.frozen.parameters(), [self.model.head.weight],
                s.l2sp_alpha, s.l2sp_beta,
            )
            loss = ce + out["reg"]
        elif s.method == "bss":
            out["reg"] = bss_penalty(features, s.bss_eta, s.bss_k)
            loss = ce + out["reg"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        """Step 5: enqueue the batch's features (after the optimiser step) and count the step."""
        if self._pending is not None:
            self.bank.enqueue(*self._pending)
            self._pending = None
        self.steps += 1

    @torch.no_grad()
    def warm_up(self, loader, device: torch.device) -> int:
        """Fill the bank with pretrained features (both banks), looping over ``loader`` until full.

        The reference stops after one pass, which leaves random slots when the dataset has fewer
        than K images; this loops instead. ``loader`` yields ``(x, y)`` or ``(x, y, index)``
        (the index is needed with cached features). Returns the number of batches used.
        """
        if self.bank is None:
            return 0
        batches = 0
        while not self.bank.full:
            for x, y, *index in loader:
                x, y = x.to(device), y.to(device)
                z_p = self._pretrained_features(x, index[0] if index else None)
                self.bank.enqueue(z_p, z_p, y)
                batches += 1
                if self.bank.full:
                    break
        return batches

    def inference_model(self) -> Classifier:
        """A standalone copy of the downstream encoder + head (no frozen copy, no banks), in eval mode."""
        return copy.deepcopy(self.model).eval()
