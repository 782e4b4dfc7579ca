"""Self-supervised continued pretraining: one loop for the CLI, the tests and every Ray Train worker.

``pretrain`` trains the backbone named by ``model.*`` with ``pretrain.method`` (MoCo v2 or SimCLR,
:mod:`drtune.self_supervised`) on unlabelled images, and writes ``backbone.safetensors``: the
backbone's own state dict (timm's keys, no head), which ``model.pretrained`` then loads strictly,
as the fine-tuned encoder's start and as DR-Tune's frozen copy. This is DR-Tune's home regime: the
paper's Table 5 gap comes from a self-supervised, in-domain backbone.

Each epoch it reports the mean self-supervised loss and the usual SSL monitor, a weighted kNN
top-1 (k = ``pretrain.knn_k``, temperature 0.1, Wu et al. 2018) of the labelled validation images
against the labelled training images, in the backbone's pooled feature space; epoch 0 is the
starting backbone. Like :func:`drtune.train.fit` it resumes exactly from ``last.pt``: model, key
encoder, MoCo's queue, optimiser, schedule and epoch; the data order and every random draw of the
augmentation are a function of (seed, epoch, rank), reseeded at each epoch's start, so each rank
augments its images independently and a resumed epoch draws what the uninterrupted one drew.

Numbers: SGD with Nesterov momentum 0.9 and a per-epoch cosine from ``pretrain.lr`` to 0; images
at ``train.image_size``, the size fine-tuning uses; bf16 autocast for the encoders on CUDA.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from drtune.backbones import create_backbone, data_config
from drtune.config import Config, dump_config
from drtune.data import ArraySplit, build_loader
from drtune.self_supervised import Contrastive, TwoViewDataset, two_views
from drtune.train import (
    CHECKPOINT_VERSION,
    check_same_run,
    load_checkpoint_state,
    loader_workers,
    pick_device,
)

KNN_TEMPERATURE = 0.1  # Wu et al. (2018), and every SSL paper's kNN monitor since
# What a resumed run must share with its checkpoint (of train.*, only the image size).
RUN_SECTIONS = {"model": True, "pretrain": True, "train": {"image_size"}}
Report = Callable[[dict, Path | None], None]


@dataclass
class PretrainResult:
    """Per-epoch history (epoch 0: the starting backbone's kNN top-1) and the trained backbone."""

    history: list[dict] = field(default_factory=list)
    backbone: nn.Module | None = None


def _world() -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


@torch.no_grad()
def _features(backbone: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> tuple[Tensor, Tensor]:
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = backbone(x.to(device))
        feats.append(nn.functional.normalize(f.float(), dim=1))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_top1(
    backbone: nn.Module,
    bank: DataLoader,
    queries: DataLoader,
    num_classes: int,
    k: int,
    device: torch.device,
    amp: bool = False,
) -> float:
    """Weighted kNN top-1 of ``queries`` against ``bank`` (cosine similarity, weights ``exp(s / 0.1)``)."""
    bank_f, bank_y = _features(backbone, bank, device, amp)
    query_f, query_y = _features(backbone, queries, device, amp)
    sims, idx = (query_f @ bank_f.T).topk(min(k, len(bank_y)), dim=1)
    votes = torch.zeros(len(query_y), num_classes, device=device)
    votes.scatter_add_(1, bank_y[idx], (sims / KNN_TEMPERATURE).exp())
    return (votes.argmax(1) == query_y).float().mean().item()


def reseed(seed: int, epoch: int, rank: int, loader: DataLoader) -> None:
    """Every random draw of an epoch from (seed, epoch, rank): torch, numpy and Python (lightly's views use
    all three), the loader's order and its worker seeds. Ranks draw different augmentations; a resumed
    epoch draws what the uninterrupted one did, with no RNG state in the checkpoint."""
    value = (seed * 1_000_003 + epoch) * 1009 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(value)


def backbone_state(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's own keys out of a :class:`~drtune.self_supervised.Contrastive` state dict (no head,
    no key encoder): what ``model.pretrained`` loads strictly."""
    return {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}


def save_backbone(state: dict[str, Tensor], path: Path, info: dict) -> None:
    """A backbone state dict as safetensors, with ``info`` (method, epochs, images, …) as JSON metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"drtune_pretrain": json.dumps(info)})
    tmp.replace(path)


def pretrain(
    config: Config,
    unlabelled: np.ndarray,
    labelled: ArraySplit,
    val: ArraySplit,
    num_classes: int,
    output_dir: str | Path,
    *,
    report: Report | None = None,
    resume: bool = True,
    device: torch.device | None = None,
    weights: bytes | None = None,
) -> PretrainResult:
    """Pretrain ``model.*``'s backbone on ``unlabelled`` (uint8 N × H × W × C) with ``pretrain.*``.

    ``labelled`` and ``val`` feed the kNN monitor only. ``report(metrics, checkpoint_path)`` is
    called after every epoch on every rank (metrics all-reduced); the checkpoint is None on epochs
    that write none (``pretrain.checkpoint_every``). Rank 0 writes ``backbone.safetensors`` at the end.
    ``weights``: the bytes of ``model.pretrained``'s file when it is on another machine (a Ray worker).
    A non-finite loss raises :class:`FloatingPointError` on every rank at once.
    """
    distributed, rank, world = _world()
    p, t = config.pretrain, config.train
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or pick_device(t.device)
    amp = t.bf16 and device.type == "cuda"
    torch.manual_seed(p.seed)
    np.random.seed(p.seed)
    random.seed(p.seed)

    start = config.model.pretrained if p.init == "weights" else "none"
    backbone = create_backbone(config.model.name, start, content=weights if p.init == "weights" else None)
    dcfg = data_config(backbone)
    model = Contrastive(
        backbone,
        p.method,
        projection_dim=p.projection_dim,
        temperature=p.temperature,
        queue_size=p.queue_size,
        ema=p.ema,
    ).to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / p.epochs)))
    if rank == 0:
        dump_config(config, out / "config.yaml")

    workers = loader_workers(t.num_workers, device)
    views = TwoViewDataset(unlabelled, two_views(p.method, t.image_size, dcfg))
    generator = torch.Generator().manual_seed(p.seed)
    sampler = (
        DistributedSampler(views, shuffle=True, seed=p.seed, drop_last=True)
        if distributed
        else RandomSampler(views, generator=generator)
    )
    loader = DataLoader(
        views, batch_size=p.batch_size, sampler=sampler, drop_last=True, num_workers=workers, generator=generator
    )
    if len(loader) == 0:
        raise ValueError(
            f"pretrain.batch_size = {p.batch_size} exceeds the {len(unlabelled) // world} unlabelled images per worker"
        )
    monitor = dict(image_size=t.image_size, batch_size=max(p.batch_size, 64), train=False, num_workers=workers)
    bank_loader, val_loader = build_loader(labelled, dcfg, **monitor), build_loader(val, dcfg, **monitor)

    def knn() -> float:
        return knn_top1(backbone, bank_loader, val_loader, num_classes, p.knn_k, device, amp)

    start_epoch, result = 0, PretrainResult()
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        state = load_checkpoint_state(ckpt)
        check_same_run(state["params"], config.model_dump(mode="json", include=RUN_SECTIONS), ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, result.history = state["epoch"] + 1, state["history"]
    else:
        result.history.append({"epoch": 0, "knn_top1": knn()})

    ddp = DistributedDataParallel(model) if distributed else model
    show = t.progress and rank == 0
    if start_epoch >= p.epochs and report is not None:  # complete already: say so again (see drtune.train.fit)
        report(result.history[-1], ckpt)
    for epoch in range(start_epoch, p.epochs):
        model.train()
        reseed(p.seed, epoch, rank, loader)
        total, started = torch.zeros(1, dtype=torch.float64, device=device), time.perf_counter()
        bar = tqdm(loader, desc=f"pretrain {p.method} epoch {epoch + 1}/{p.epochs}", disable=not show, leave=False)
        for view0, view1 in bar:
            view0, view1 = view0.to(device, non_blocking=True), view1.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = ddp(view0, view1)
            bad = (~torch.isfinite(loss.detach())).float()
            if distributed:  # every rank stops at the same step, none waits in a collective for a dead one
                dist.all_reduce(bad)
            if bad.item():
                raise FloatingPointError(f"the {p.method} loss diverged in epoch {epoch + 1}: lower pretrain.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.after_step()
            total += loss.detach().double()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_s = time.perf_counter() - started
        if distributed:
            dist.all_reduce(total)
        lr_used = opt.param_groups[0]["lr"]
        sched.step()
        metrics = {
            "epoch": epoch + 1,
            "ssl_loss": total.item() / (len(loader) * world),
            "knn_top1": knn(),
            "lr": lr_used,
            "epoch_s": train_s,
            "images_per_s": len(loader) * p.batch_size * world / train_s,
        }
        result.history.append(metrics)
        written = (epoch + 1) % p.checkpoint_every == 0 or epoch + 1 == p.epochs
        if rank == 0 and written:
            state = {
                "version": CHECKPOINT_VERSION,
                "kind": "pretrain",
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "params": config.model_dump(mode="json", include=RUN_SECTIONS),
                "history": result.history,
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
        if show:
            tqdm.write(
                f"pretrain epoch {epoch + 1}: loss {metrics['ssl_loss']:.4f} kNN top-1 {metrics['knn_top1']:.4f}"
            )
        if report is not None:
            report(metrics, ckpt if written else None)
    if rank == 0:
        info = {
            "method": p.method,
            "init": p.init,
            "epochs": p.epochs,
            "images": len(unlabelled),
            "knn_top1_start": result.history[0]["knn_top1"],
            "knn_top1": result.history[-1]["knn_top1"],
            "model": config.model.name,
        }
        save_backbone(backbone.state_dict(), out / "backbone.safetensors", info)
    result.backbone = backbone
    return result
