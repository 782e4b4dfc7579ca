"""Whole `drtune fit` epochs on CUDA with the real data path: images/s per model, method and augmentation.

Fashion-MNIST (the four idx files in data/raw/fashion-mnist/ or Debian's dataset-fashion-mnist),
1,000 labels per class (8,000 training images after the validation split), 224 px, batch 128,
K = 2048, bf16. Each case trains 2 epochs; the table gives epoch 2's training images/s (the
steps and their data loading, not validation) from fit's own `images_per_s` metric, so the first
epoch's warm-up (cuDNN autotuning, loader start-up) is left out. Compare it with bench/step.py's
synthetic step for the same model and method: the goal is at least 80 % of it.

    python3 bench/gpu_fit.py [--out bench/results/gpu_fit.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from drtune.config import load_config
from drtune.sources import load_splits
from drtune.train import fit

CASES = [  # model, pretrained weights, method, where the training crops are made, loader processes
    ("tf_efficientnet_lite0", "bundled", "ce", "loader", 0),
    ("tf_efficientnet_lite0", "bundled", "ce", "loader", 12),
    ("tf_efficientnet_lite0", "bundled", "ce", "device", 12),
    ("tf_efficientnet_lite0", "bundled", "drtune", "loader", 12),
    ("tf_efficientnet_lite0", "bundled", "drtune", "device", 12),
    ("resnet50", "none", "ce", "loader", 12),
    ("resnet50", "none", "ce", "device", 12),
    ("resnet50", "none", "drtune", "loader", 12),
    ("resnet50", "none", "drtune", "device", 12),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu_fit.json")
    parser.add_argument("--runs", default="/tmp/drtune-gpu-fit")
    args = parser.parse_args()
    rows = []
    print(f"{'model':<22} {'method':<7} {'augment':<7} {'workers':>7} {'img/s':>8} {'val top1':>9} {'wall s':>7}")
    for model, weights, method, augment_on, workers in CASES:
        config = load_config(
            None,
            [
                f"model.name={model}",
                f"model.pretrained={weights}",
                f"train.method={method}",
                "train.device=cuda",
                "train.image_size=224",
                "train.batch_size=128",
                "train.epochs=2",
                "data.labels_per_class=1000",
                "drtune.queue_size=2048",
                f"train.num_workers={workers}",
                f"train.augment_on={augment_on}",
                "train.progress=false",
            ],
        )
        raw, (train, val, _) = load_splits(config.data)
        started = time.perf_counter()
        history = fit(
            config, train, val, raw.classes, Path(args.runs) / f"{model}-{method}-{augment_on}-{workers}", resume=False
        ).history
        row = dict(
            model=model,
            method=method,
            augment_on=augment_on,
            workers=workers,
            n_train=len(train),
            images_per_s=round(history[-1]["images_per_s"], 1),
            val_top1=round(history[-1]["val_top1"], 4),
            wall_s=round(time.perf_counter() - started, 1),
        )
        rows.append(row)
        print(
            f"{model:<22} {method:<7} {augment_on:<7} {workers:>7} {row['images_per_s']:>8.0f} "
            f"{row['val_top1']:>9.4f} {row['wall_s']:>7.1f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
