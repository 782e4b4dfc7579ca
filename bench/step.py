"""Training-step cost of DR-Tune against CE-tuning, with DR-Tune's extra work broken down.

    python bench/step.py                                  # Lite0 (bundled) and ResNet-50 (random), 64 px, batch 32
    python bench/step.py --models tf_efficientnet_lite0 --image-size 96 --steps 20
    python bench/step.py --device cuda --models resnet50 --image-size 224 --batch-size 64 128 --queue-size 2048

Both methods run the same backbone, image size, batch and optimiser on the same batches, in one
process, interleaved by model. DR-Tune uses the reference rotation schedule (every 10th step)
and, as a second row, rotation every step; a third row takes the pretrained features from a
cache built before training (``drtune.pretrained_features: cached``: no frozen forward per
step). The breakdown times the pieces DR-Tune adds by wrapping them (frozen encoder forward,
semantic calibration, the linear head: on the batch, and for DR-Tune also on the K bank rows)
and the backward pass; "trainable forward + optimiser" is the rest. On CUDA each timed piece is
synchronised, the step runs under bf16 autocast with channels_last, and the table adds model
FLOP utilisation (forward + backward FLOPs counted once by torch's FlopCounterMode, over the
card's dense bf16 peak given by --peak-tflops). Two more rows rotate every step with the full
D × D rotation (``rotation_between: reuse``), computed at once or overlapped with the backward
pass on a side CUDA stream (``rotation_timing: overlapped``); they are timed without the
breakdown, whose synchronisation would serialise the side stream, so only against each other.
Prints a table and writes bench/results/step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from drtune.backbones import create_backbone
from drtune.config import Config
from drtune.task import FineTuneTask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timers:
    """Wall time accumulated by named pieces of the step (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.total[name] += time.perf_counter() - start
            return out

        setattr(obj, attr, timed)


def step_flops(
    task: FineTuneTask, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor
) -> float:
    """Forward + backward (+ optimiser) FLOPs of one training step, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        task.train_step(opt, x, y, index, amp=x.device.type == "cuda")
    return float(counter.get_total_flops())


def variant(method: str = "drtune", **drtune) -> Config:
    """A resolved config of one benchmarked variant (``drtune`` keys go to the drtune section)."""
    return Config(train={"method": method}, drtune=drtune).resolved()


def run(
    model_name: str,
    pretrained: str,
    config: Config,
    batches: list,
    warmup: int,
    device: torch.device,
    breakdown: bool = True,
) -> dict:
    torch.manual_seed(0)
    task = FineTuneTask(create_backbone(model_name, pretrained), 10, config).to(device)
    amp = device.type == "cuda"
    if amp:
        task.to(memory_format=torch.channels_last)
    timers = Timers(device)
    backward = torch.Tensor.backward
    if breakdown:
        timers.wrap(task.model.head, "forward", "head")
        timers.wrap(torch.Tensor, "backward", "backward")
    if task.frozen is not None:
        if breakdown:
            timers.wrap(task.frozen, "forward", "frozen forward")
            timers.wrap(task, "calibrated_bank", "calibration")
        if task.cached_features:  # built once before training; not part of the step
            task.cache_pretrained_features(
                DataLoader(TensorDataset(*map(torch.cat, zip(*batches, strict=True))), batch_size=64), device
            )
        task.warm_up(batches, device)
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, nesterov=True)
    task.train()
    try:
        flops = step_flops(task, opt, *batches[0]) if amp else 0.0
        steps = 0
        for i, (x, y, index) in enumerate(batches + batches[:warmup]):
            if i == warmup:
                timers.total.clear()
                sync(device)
                start = time.perf_counter()
            task.train_step(opt, x, y, index, amp=amp)
            steps += i >= warmup
        sync(device)
    finally:
        torch.Tensor.backward = backward
    step = (time.perf_counter() - start) / steps
    parts = {k: v / steps for k, v in timers.total.items()}
    if breakdown:
        parts["trainable forward + optimiser"] = step - sum(parts.values())
    return {"step_s": step, "images_per_s": len(batches[0][0]) / step, "parts_s": parts, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps (a multiple of 10 covers the rotation schedule)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    parser.add_argument("--out", default="bench/results/step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    name_of = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    for batch in args.batch_size:
        gen = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(device),
                torch.randint(0, 10, (batch,), generator=gen).to(device),
                torch.arange(i * batch, (i + 1) * batch, device=device),
            )
            for i in range(args.steps)
        ]
        if device.type == "cuda":
            batches = [(x.contiguous(memory_format=torch.channels_last), y, i) for x, y, i in batches]
        for name in args.models:
            pretrained = "bundled" if name == "tf_efficientnet_lite0" else "none"
            k = args.queue_size
            reused = dict(queue_size=k, rotation_every=1, rotation_between="reuse")
            variants = {  # label: (config, timed with the breakdown)
                "CE-tuning": (variant("ce"), True),
                "DR-Tune, rotation every 10th step": (variant(queue_size=k, rotation_every=10), True),
                "DR-Tune, rotation every step": (variant(queue_size=k, rotation_every=1), True),
                "DR-Tune, cached features, rot. /10": (
                    variant(queue_size=k, rotation_every=10, pretrained_features="cached"),
                    True,
                ),
                "DR-Tune, D×D rot. every step, no parts": (variant(**reused), False),
                "DR-Tune, overlapped rot. every step, no parts": (
                    variant(**reused, rotation_timing="overlapped"),
                    False,
                ),
            }
            results = {
                label: run(name, pretrained, s, batches, 2, device, breakdown=parts)
                for label, (s, parts) in variants.items()
            }
            ce = results["CE-tuning"]
            for label, r in results.items():
                mfu = r["flops"] / r["step_s"] / (args.peak_tflops * 1e12) if r["flops"] else None
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "method": label,
                        "ratio_to_ce": r["step_s"] / ce["step_s"],
                        "throughput_vs_ce": r["images_per_s"] / ce["images_per_s"],
                        "mfu": mfu,
                        **r,
                    }
                )
    print(f"{name_of}; {args.image_size} px, K = {args.queue_size}; seconds per step")
    print(f"{'model':22s} {'batch':>5s} {'method':46s} {'step':>7s} {'img/s':>8s} {'× CE':>6s} {'MFU':>6s}  breakdown")
    for r in rows:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in r["parts_s"].items())
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['model']:22s} {r['batch']:5d} {r['method']:46s} {r['step_s']:7.4f} {r['images_per_s']:8.1f} "
            f"{r['ratio_to_ce']:6.2f} {mfu:>6s}  {parts}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": name_of, "image_size": args.image_size, "queue_size": args.queue_size, "rows": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
