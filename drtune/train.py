"""The training loop: one function for the CLI, the tests and every Ray Train worker.

``fit`` builds the task from a validated :class:`~drtune.config.Config`, warms up the bank,
then for each epoch runs :meth:`FineTuneTask.train_step` over the batches, validates with
:func:`drtune.evaluation.evaluate` (top-1, top-5, loss; all-reduced across ranks), writes
``last.pt`` (every ``train.checkpoint_every`` epochs and after the last) and hands the metrics and
that checkpoint to a reporting callback. The run lasts ``train.epochs`` epochs, or, with a step
budget ``train.steps``, the epochs :func:`epochs_for_steps` makes of it. A run restarted
with ``resume=True`` continues exactly where it stopped: model, optimiser, scheduler, banks and
their pointer, epoch, step and every RNG are restored, and the data order is a function of
(seed, epoch).

Numbers worth knowing: the optimiser is SGD with Nesterov momentum 0.9; the learning rate
follows a cosine from its initial value to 0 over ``epochs`` and changes once per epoch, as in
the reference code; ``lr_backbone`` and ``lr_head`` are the real step sizes of Eq. 14's gradient.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from drtune.augment import DeviceBatches, augment_on_device
from drtune.backbones import create_backbone, data_config
from drtune.config import Config, ConfigError, dump_config
from drtune.data import ArraySplit, build_loader, set_epoch
from drtune.evaluation import evaluate
from drtune.task import FineTuneTask

CHECKPOINT_VERSION = 2  # 2: loads with weights_only=True (numpy's RNG state as a tensor)
Report = Callable[[dict, Path | None], None]


class DivergedError(FloatingPointError):
    """The loss became NaN or infinite: a property of the settings, which a retry would repeat."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(f"{message} in epoch {epoch}")
        self.epoch = epoch


@dataclass
class FitResult:
    """Per-epoch validation history and the trained task (its model is the last epoch's: the tested one)."""

    history: list[dict] = field(default_factory=list)
    task: FineTuneTask | None = None


def _distributed() -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when available (the local rank's GPU under torchrun), else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def loader_workers(choice: int | str, device: torch.device) -> int:
    """Data-loader processes: a number as given; ``auto`` is 0 on the CPU, where the training step
    itself uses every core and in-memory images need no help, and on CUDA one per CPU thread this
    process was given (a Ray worker sets them to ``ray.cpus_per_worker``), at most 12: measured on
    an H200 with 16 cores, 12 loader workers doubled Lite0's CE epoch throughput over 0."""
    if choice != "auto":
        return int(choice)
    return 0 if device.type == "cpu" else min(12, torch.get_num_threads())


def build_task(
    config: Config, num_classes: int, world_size: int = 1, weights: bytes | None = None
) -> tuple[FineTuneTask, Config, dict]:
    """(task, resolved config, backbone data config) from a validated config; ``weights``: the bytes of
    ``model.pretrained``'s file when it is on another machine (:func:`drtune.backbones.create_backbone`)."""
    resolved = config.resolved(world_size)
    backbone = create_backbone(resolved.model.name, resolved.model.pretrained, content=weights)
    return FineTuneTask(backbone, num_classes, resolved), resolved, data_config(backbone)


def epochs_for_steps(config: Config, n_train: int, world_size: int = 1) -> int:
    """The epochs a run trains: ``train.epochs``, or with ``train.steps`` the fewest epochs that hold that many
    optimiser steps, ``ceil(steps / steps_per_epoch)``. ``steps_per_epoch`` is the training loader's length:
    the full batches of ``train.batch_size`` in the ``n_train // world_size`` images each worker sees (the
    last partial batch is dropped). A worker's share that holds no full batch is a :class:`ConfigError`."""
    t = config.train
    per_epoch = n_train // world_size // t.batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} exceeds the {n_train // world_size} training images per worker"
        )
    return t.epochs if t.steps is None else math.ceil(t.steps / per_epoch)


def build_optimizer(
    task: FineTuneTask, config: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD-Nesterov (or AdamW) with backbone and head groups and a per-epoch cosine schedule.

    On CUDA the update is one fused kernel over all parameters instead of a kernel per tensor
    (ResNet-50 has 161 of them); on the CPU torch's default per-tensor loop is kept.
    """
    t = config.train
    backbone, head = task.param_groups()
    groups = [{"params": head, "lr": t.lr_head}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": t.lr_backbone})
    fused = {"fused": True} if head[0].is_cuda else {}
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(
            groups, lr=t.lr_backbone, momentum=t.momentum, nesterov=t.momentum > 0, weight_decay=t.weight_decay, **fused
        )
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr_backbone, weight_decay=t.weight_decay, **fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / t.epochs)))
    return opt, sched


def _short(value):
    """A setting as the preset line shows it: floats to 3 significant digits (0.000303030… → 0.000303)."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def rng_state() -> dict:
    """Every RNG a run draws from (torch, CUDA, numpy, Python), for an exact resume."""
    # numpy's state as a tensor and numbers, so the whole checkpoint loads with ``weights_only=True``.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path, task: FineTuneTask, opt, sched, epoch: int, config: Config, classes: list[str], history: list[dict]
) -> None:
    """Atomically write everything exact resume needs (and what inference needs: classes, model name)."""
    state = {
        "version": CHECKPOINT_VERSION,
        "task": task.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "params": config.model_dump(mode="json"),
        "classes": classes,
        "history": history,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint_state(path: Path) -> dict:
    """Read a training checkpoint written by :func:`save_checkpoint` and check its version.

    Tensors, numbers, strings and containers only (``weights_only=True``): a checkpoint on shared
    storage that someone crafted cannot run code when a run resumes from it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"cannot resume from {path}: the file is damaged, truncated or holds more than tensors and "
            f"numbers ({type(err).__name__}); delete it to start the run afresh"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"checkpoint {path} has version {found}, expected {CHECKPOINT_VERSION} (written by another "
            "release); delete it to start the run afresh"
        )
    return state


# Settings that may change between a run and its resumption; any other difference is an error.
_RESUMABLE_CHANGES = {
    "train.epochs",
    "train.steps",
    "train.checkpoint_every",
    "train.progress",
    "train.num_workers",
    "train.device",
    "pretrain.knn_k",
    "pretrain.checkpoint_every",
}


def check_same_run(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume a checkpoint written under different settings, naming each field."""
    diffs = [
        f"{section}.{key}: checkpoint {value!r}, now {current.get(section, {}).get(key)!r}"
        for section, values in saved.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if f"{section}.{key}" not in _RESUMABLE_CHANGES and current.get(section, {}).get(key) != value
    ]
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written with other settings:\n  " + "\n  ".join(diffs))


def fit(
    config: Config,
    train: ArraySplit,
    val: ArraySplit,
    classes: list[str],
    output_dir: str | Path,
    *,
    report: Report | None = None,
    resume: bool = True,
    device: torch.device | None = None,
    weights: bytes | None = None,
    validate_at: Collection[int] = (),
) -> FitResult:
    """Fine-tune once. Works alone, under torchrun and inside a Ray Train worker (gloo or nccl).

    The epochs validated are every ``train.validate_every``-th, the last and those in ``validate_at`` (1-based: a
    search's ASHA rungs, where trials are judged). ``report(metrics, checkpoint_path)`` is called after each of
    them on every rank, and the history holds them (metrics are already all-reduced; ``epoch_s``, ``val_s`` and,
    on rank 0 when it wrote one, ``checkpoint_s`` time the epoch's training steps, its validation and its
    checkpoint). ``last.pt`` is written every ``train.checkpoint_every`` epochs and after the last; a report
    hands over the one written since the previous report, else None (a long schedule over a few images is
    hundreds of short epochs, and writing each would cost more than training it).
    With ``train.steps`` the epochs are :func:`epochs_for_steps`'s, set before the optimiser and
    its cosine schedule are built; the resolved ``config.yaml`` shows both. Rank 0 prints one line
    naming each setting a preset changed (:meth:`Config.preset_changes`).

    With ``resume`` and an existing ``output_dir/last.pt`` the run continues from it; a checkpoint
    that already holds every epoch trains nothing and reports its last epoch again, so a caller
    interrupted between the checkpoint and its record of the report (a Tune trial) still learns
    the run's true final result. ``device`` defaults to ``train.device``; a Ray worker passes the
    one Ray Train assigned it, and ``weights``, the bytes of ``model.pretrained``'s file when that
    file is on the driver's machine only (the pretrain stage's backbone).
    """
    distributed, rank, world = _distributed()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = config.train
    device = device or pick_device(t.device)
    amp = t.bf16 and device.type == "cuda"
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)

    epochs = epochs_for_steps(config, len(train), world)
    task, resolved, dcfg = build_task(config, len(classes), world, weights)
    if rank == 0 and (changes := config.preset_changes(world)):
        shown = ", ".join(f"{k} {_short(a)} → {_short(b)}" for k, (a, b) in changes.items())
        tqdm.write(f"preset {config.drtune.preset}: {shown}")
    resolved.train.epochs = epochs  # task.config is this object: the task sees it too
    task.to(device)
    if amp:
        task.to(memory_format=torch.channels_last)
    opt, sched = build_optimizer(task, resolved)
    if rank == 0:
        dump_config(resolved, out / "config.yaml")

    workers = loader_workers(t.num_workers, device)
    loader_args = dict(image_size=t.image_size, seed=t.seed, num_workers=workers, distributed=distributed)
    if augment_on_device(t.augment_on, device, train):
        train_loader = DeviceBatches(
            train, dcfg, t.image_size, t.batch_size, device, seed=t.seed, distributed=distributed
        )
    else:
        train_loader = build_loader(train, dcfg, batch_size=t.batch_size, train=True, with_index=True, **loader_args)
    val_loader = build_loader(val, dcfg, batch_size=max(t.batch_size, 64), train=False, **loader_args)

    if task.cached_features:
        # Every rank encodes the whole split once (un-augmented, eval transform): the cache is
        # indexed by position in the split, and the distributed sampler visits all of it.
        plain = build_loader(
            train,
            dcfg,
            image_size=t.image_size,
            batch_size=max(t.batch_size, 64),
            train=False,
            num_workers=workers,
            with_index=True,
        )
        task.cache_pretrained_features(plain, device)

    start_epoch, result = 0, FitResult()
    ckpt = out / "last.pt"
    if resume and ckpt.exists():
        state = load_checkpoint_state(ckpt)
        check_same_run(state["params"], resolved.model_dump(mode="json"), ckpt)
        task.load_state_dict(state["task"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        result.history = state["history"]
        set_rng_state(state["rng"])
    else:
        set_epoch(train_loader, t.seed, -1)
        task.warm_up(train_loader, device)

    model = DistributedDataParallel(task.model) if distributed else task.model
    show = t.progress and rank == 0
    unreported = False  # a checkpoint written since the last report
    if start_epoch >= epochs and result.history and report is not None:
        report(result.history[-1], ckpt)
    for epoch in range(start_epoch, epochs):
        task.train()
        task.start_epoch()
        set_epoch(train_loader, t.seed, epoch)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, CE, regulariser: summed over the epoch's steps
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
        started = time.perf_counter()
        for x, y, index in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if amp:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                step = task.train_step(opt, x, y, index, model=model, amp=amp)
            except FloatingPointError as err:
                raise DivergedError(str(err), epoch + 1) from None
            totals += torch.tensor([step["loss"], step["ce"], step["reg"]], dtype=torch.float64)
            bar.set_postfix(loss=f"{step['loss']:.3f}")
        train_s = time.perf_counter() - started  # the training steps, data loading included; not validation
        # The head's group is the last; a method that trains the backbone has its group first.
        rates = {"lr_backbone": opt.param_groups[0]["lr"]} if len(opt.param_groups) > 1 else {}
        rates["lr_head"] = opt.param_groups[-1]["lr"]
        sched.step()
        written = (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == epochs
        validated = (epoch + 1) % t.validate_every == 0 or epoch + 1 == epochs or epoch + 1 in validate_at
        if not validated:
            if rank == 0 and written:
                save_checkpoint(ckpt, task, opt, sched, epoch, resolved, classes, result.history)
                unreported = True
            continue
        started = time.perf_counter()
        scores = evaluate(model, val_loader, device, amp=amp)
        val_s = time.perf_counter() - started
        steps = len(train_loader)
        metrics = {
            "val_top1": scores["top1"],
            "val_balanced_accuracy": scores["balanced_accuracy"],
            "val_macro_f1": scores["macro_f1"],
            "val_top5": scores["top5"],
            "val_loss": scores["loss"],
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / steps,
            "train_ce": totals[1].item() / steps,
            "train_reg": totals[2].item() / steps,
            **rates,
            "epoch_s": train_s,
            "val_s": val_s,
            "images_per_s": steps * t.batch_size * world / train_s,
        }
        result.history.append(metrics)
        if rank == 0 and written:
            started = time.perf_counter()
            save_checkpoint(ckpt, task, opt, sched, epoch, resolved, classes, result.history)
            metrics = metrics | {"checkpoint_s": time.perf_counter() - started}  # reported, not in the history
        if show:
            tqdm.write(f"epoch {epoch + 1}: val top1 {metrics['val_top1']:.4f} loss {metrics['val_loss']:.4f}")
        if report is not None:
            report(metrics, ckpt if written or unreported else None)
        unreported = False
    result.task = task
    return result
