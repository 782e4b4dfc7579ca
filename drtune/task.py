"""The fine-tuning task: a trainable encoder + head, a frozen pretrained encoder and the banks, as one module.

One training step of DR-Tune (paper Sec. 3, Alg. 1) reads, top to bottom, in :meth:`FineTuneTask.train_step`:

1. ``z_d = f_d(x)``, ``logits = g(z_d)`` — the trainable classifier (the only DDP-wrapped part);
2. ``z_p = f_p(x)`` — the frozen pretrained encoder on the *same* augmented images (eval, no grad);
   with ``drtune.pretrained_features: cached`` it is looked up instead: ``f_p`` of the
   un-augmented image, computed once before training (:meth:`FineTuneTask.cache_pretrained_features`),
   which removes the one extra forward pass DR-Tune adds to a CE-tuning step;
3. ``v̂ = SC(M_p, M_d, y_bank)`` — semantic calibration of the bank as it was *before* this batch;
4. ``loss = CE(logits, y) + λ · CE(g(v̂), y_bank)`` — DR gradients reach only the head, since
   ``v̂`` is a constant;
5. backward and the optimiser step;
6. ``(z_p, z_d, y)`` are enqueued, after the update, as in the reference code.

With ``drtune.rotation_timing: overlapped`` a step that recomputes the rotation computes it after
step 6, from a copy of the banks its step 3 saw, and the steps after it apply it: one step stale.
On CUDA it runs on a side stream beside the step's backward pass (:meth:`FineTuneTask._rotate_snapshot`).

Mixed precision: only the two encoders' forward passes (steps 1–2) run under bf16 autocast.
The banks store float32 unit-norm rows, and the calibration (SVD, determinant, class sums), the
DR term's head pass and the baselines' regularisers (BSS's singular values) all run in float32
outside autocast, whatever the caller's precision: torch has no bf16 linear algebra, and the
calibration's small singular values would not survive 8 mantissa bits anyway.

The baselines share the same step with a different regulariser: ``ce`` (none), ``linear_probe``
(frozen backbone), ``l2sp`` and ``bss``. What each method keeps and its objective are its
:class:`~drtune.methods.MethodSpec`; this module asks the spec, never the method's name.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from drtune import methods
from drtune.bank import FeatureBank
from drtune.calibration import procrustes_rotation_matrix, semantic_calibrate
from drtune.config import Config


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
    """Everything one fine-tuning run trains or carries: classifier, frozen encoder, banks.

    ``config`` is a resolved :class:`~drtune.config.Config` (:meth:`Config.resolved`): the task
    reads ``train.method`` (its :class:`~drtune.methods.MethodSpec`), the ``drtune`` section and the
    ``baselines`` section.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, config: Config) -> None:
        super().__init__()
        self.config = config
        self.spec = spec = methods.get(config.train.method)
        dr = config.drtune
        # The frozen encoder is a deep copy of the pretrained backbone taken before any update:
        # DR-Tune's f_p, and L2-SP's starting point w₀.
        self.frozen = copy.deepcopy(backbone).eval().requires_grad_(False) if spec.frozen_copy else None
        self.model = Classifier(backbone, num_classes)
        self.bank = FeatureBank(dr.queue_size, backbone.num_features) if spec.feature_bank else None
        self.cached_features = spec.feature_bank and dr.pretrained_features == "cached"
        if not spec.trains_backbone:
            backbone.requires_grad_(False)
        if self.bank is not None and dr.rotation_between == "reuse":
            # The last rotation, applied between recomputations; in the checkpoint with the banks.
            self.register_buffer("rotation", torch.zeros(backbone.num_features, backbone.num_features))
            self.register_buffer("has_rotation", torch.zeros((), dtype=torch.bool))
        else:
            self.rotation = None
        self.overlapped = self.rotation is not None and dr.rotation_timing == "overlapped"
        # rotation_timing = overlapped: the banks a step's SC saw (:meth:`_snapshot_banks`), kept until the
        # rotation is computed from them after the update.
        self._snapshot: tuple[Tensor, Tensor, torch.cuda.Event | None] | None = None
        self._side_stream: torch.cuda.Stream | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # The step count at the start of the current epoch (:meth:`start_epoch`); not stored: a checkpoint
        # ends an epoch, and the loop marks the next epoch's start after resuming from it.
        self.epoch_start_step = 0
        # Not a buffer: a deterministic function of the frozen encoder and the training split,
        # rebuilt on resume rather than stored in every checkpoint.
        self.feature_cache: Tensor | None = None
        self._calibrated: Tensor | None = None  # reused output of SC: no fresh K × D tensor per step

    def train(self, mode: bool = True) -> FineTuneTask:
        """Train mode for the trainable parts; the frozen encoder, and a probed backbone, stay in eval."""
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        if not self.spec.trains_backbone:
            self.model.encoder.eval()
        return self

    def start_epoch(self) -> None:
        """Mark the start of an epoch: ``drtune.rotation_schedule = epoch`` counts batches from here."""
        self.epoch_start_step = int(self.steps)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, head parameters) — they get separate learning rates."""
        backbone = [p for p in self.model.encoder.parameters() if p.requires_grad]
        return backbone, list(self.model.head.parameters())

    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        index: Tensor | None = None,
        *,
        model: nn.Module | None = None,
        amp: bool = False,
    ) -> dict[str, float]:
        """One whole training step, in its only order: forward, loss, backward, update, enqueue (and, with an
        overlapped rotation, the rotation the next steps apply).

        ``model`` is ``self.model`` (the default) or its DDP wrapper; ``index`` (the images'
        positions in the training split) is needed only with cached features; ``amp`` runs the
        encoders under bf16 autocast. Returns the step's ``loss``, ``ce`` and ``reg`` (0 without a
        regulariser). A non-finite loss raises :class:`FloatingPointError` before the update.
        """
        model = self.model if model is None else model
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            features, logits = model(x, return_features=True)
            z_p = self._pretrained_features(x, index) if self.bank is not None else None
        # Everything below is float32 whatever the caller's autocast (see the module docstring).
        with torch.autocast(x.device.type, enabled=False):
            features, logits = features.float(), logits.float()
            loss, ce, reg = self.spec.loss(self, features, logits, y)  # Eq. 14 for DR-Tune, the baselines' otherwise
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {int(self.steps)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if self.bank is not None:
            self.bank.enqueue(z_p, features.detach(), y)
        if self._snapshot is not None:
            self._rotate_snapshot()
        self.steps += 1
        return {"loss": loss.item(), "ce": ce.item(), "reg": reg.item()}

    def calibrated_bank(self, batch_down: Tensor) -> Tensor:
        """Step 3: the bank's pretrained features, calibrated (or only normalised and scaled); float32."""
        s, bank = self.config.drtune, self.bank
        scale = batch_down.detach().norm(dim=1).mean()
        if not s.sc:
            return bank.pre * scale
        rotating = s.rotate and s.rotation_every > 0
        # global: the run's step count; epoch (the reference code's rule): the batch index within the epoch
        step = int(self.steps) - (self.epoch_start_step if s.rotation_schedule == "epoch" else 0)
        due = rotating and step % s.rotation_every == 0
        rotate, rotation = due, None
        if rotating and self.overlapped:
            # The rotation of an earlier step's banks, once there is one; this step's comes after the update.
            rotate, rotation = bool(self.has_rotation), self.rotation
        elif rotating and self.rotation is not None:
            if due or not bool(self.has_rotation):
                self.rotation.copy_(procrustes_rotation_matrix(bank.pre, bank.down))
                self.has_rotation.fill_(True)
            rotate, rotation = True, self.rotation
        if self._calibrated is None or self._calibrated.device != bank.pre.device:
            self._calibrated = torch.empty_like(bank.pre)
        # The previous step's backward, which read this buffer, has already run.
        calibrated = semantic_calibrate(
            bank.pre,
            bank.down,
            bank.labels,
            self.model.head.weight.detach(),
            scale,
            rotate=rotate,
            translate=s.translate,
            confidence=s.confidence,
            normalized=True,
            rotation=rotation,
            out=self._calibrated,
        )
        if self.overlapped and due:
            self._snapshot = self._snapshot_banks()
        return calibrated

    def _snapshot_banks(self) -> tuple[Tensor, Tensor, torch.cuda.Event | None]:
        """Copies of the banks as SC saw them at this step and, on CUDA, an event recorded after them.

        The event also follows SC's read of ``rotation``, which the side stream overwrites.
        """
        pre, down = self.bank.pre.clone(), self.bank.down.clone()
        if not pre.is_cuda:
            return pre, down, None
        taken = torch.cuda.Event()
        taken.record(torch.cuda.current_stream(pre.device))
        return pre, down, taken

    def _rotate_snapshot(self) -> None:
        """``rotation`` := the Procrustes rotation of the banks SC saw at this step, for the steps after it.

        Called at the end of the step, after the enqueue. On CUDA the main stream then already holds
        this step's backward pass, optimiser step and enqueue, and the rotation runs beside them on a
        side stream that waits only for the snapshot's event; it reads the copies (the enqueue
        overwrites the banks in place), and the main stream waits for it before the next step.
        torch reads the SVD's convergence flag on the host, so this call returns once the SVD is
        done. On the CPU the same computation runs inline: the algorithm is the same, one step stale.
        """
        pre, down, taken = self._snapshot
        self._snapshot = None
        if taken is None:
            self.rotation.copy_(procrustes_rotation_matrix(pre, down))
        else:
            main = torch.cuda.current_stream(pre.device)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(pre.device)
            side = self._side_stream
            side.wait_event(taken)
            with torch.cuda.stream(side):
                self.rotation.copy_(procrustes_rotation_matrix(pre, down))
            # The copies were made on the main stream: their memory is not reused until the side stream is done.
            pre.record_stream(side)
            down.record_stream(side)
            main.wait_stream(side)
        self.has_rotation.fill_(True)

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
        if self.cached_features:
            if self.feature_cache is None or index is None:
                raise RuntimeError("cached_features needs cache_pretrained_features() and each batch's index")
            return self.feature_cache[index.to(self.feature_cache.device)]
        with torch.no_grad():
            return self.frozen(x)

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
