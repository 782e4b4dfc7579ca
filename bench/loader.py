"""Is the data loader the bottleneck? Images/s of the training loader alone against a training step.

    python bench/loader.py                          # params.yaml's data, model, image size and batch
    python bench/loader.py --set train.image_size=96 --batches 20

Both run in one process on the same prepared split: first the loader alone (decode, random
resized crop, flip, normalise, collate), then full DR-Tune and CE training steps fed from
tensors already in memory. Prints a table and writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from drtune import methods
from drtune.config import load_config
from drtune.data import build_loader, set_epoch
from drtune.sources import load_splits
from drtune.train import build_optimizer, build_task


def loader_rate(loader, batches: int) -> float:
    set_epoch(loader, 0, 0)
    it, n, start = iter(loader), 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - start)


def step_rate(config, batches_xy, num_classes: int) -> float:
    task, resolved, _ = build_task(config, num_classes)
    task.warm_up(batches_xy, torch.device("cpu"))
    opt, _ = build_optimizer(task, resolved)
    task.train()
    n, start = 0, time.perf_counter()
    for x, y in batches_xy:
        task.train_step(opt, x, y)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    config = load_config(args.params, [*args.set, "train.progress=false"])
    raw, (train, _, _) = load_splits(config.data)
    t = config.train
    _, _, dcfg = build_task(config, len(raw.classes))
    rows = []
    for workers in (0, 1):
        loader = build_loader(train, dcfg, t.image_size, t.batch_size, train=True, num_workers=workers)
        rows.append((f"loader alone, num_workers={workers}", loader_rate(loader, args.batches)))
    loader = build_loader(train, dcfg, t.image_size, t.batch_size, train=True)
    set_epoch(loader, 0, 0)
    batches_xy = [b for _, b in zip(range(args.batches), loader, strict=False)]
    for method in (methods.PROPOSED, methods.PLAIN):
        p = load_config(args.params, [*args.set, f"train.method={method}"])
        rows.append((f"training step, {method}", step_rate(p, batches_xy, len(raw.classes))))
    step = rows[2][1]
    print(f"{config.model.name}, {t.image_size} px, batch {t.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'':38s} {'images/s':>9s} {'× DR-Tune step':>15s}")
    for name, rate in rows:
        print(f"{name:38s} {rate:9.1f} {rate / step:15.1f}")
    out = Path("bench/results/loader.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "model": config.model.name,
                "image_size": t.image_size,
                "batch_size": t.batch_size,
                "images_per_s": dict(rows),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
