"""DR-Tune's home regime: a self-supervised, in-domain backbone with few labels, against plain fine-tuning.

    python bench/home_regime.py --labels 10 --seeds 3 --steps 150 --ssl-images 2000   # this CPU (about an hour)
    bash bench/gpu_home_regime.sh run                                                  # the larger grid on a GPU
    python bench/home_regime.py --quick                                                # a 2-minute smoke

Why: the paper's Table 5 gap (10 % of ImageNet20: CE-tuning 58.37, SSF 90.17, DR-Tune 92.73) comes from
a MoCo-v2 backbone, self-supervised in domain, on which CE-tuning collapses. With our bundled supervised,
out-of-domain Lite0, DR-Tune and CE-tuning were level within the noise (bench/datascale.py). This script
builds the home regime: Lite0 (ImageNet weights) is self-supervised further with MoCo v2 on Fashion-MNIST's
training images (labels unused; as in the paper, the labelled images are part of the pretraining pool,
the test images never are), then both backbones are fine-tuned at fixed settings:

* ``linear_probe``      the head alone (rate 0.1): what the backbone's features are worth as they are;
* ``ce_paper``          CE-tuning with the paper's recipe, backbone rate = head rate = 0.01;
* ``ce_drtune_rates``   CE-tuning at DR-Tune's effective rates with no DR term: what ``drtune.preset:
                        reference`` resolves to (backbone r/(1 + K/B), head r, weight decay × (1 + K/B)),
                        copied from the resolved config so the control cannot drift from the preset. It
                        separates the authors' learning-rate rule from the regulariser;
* ``drtune_reference``  DR-Tune, ``preset: reference`` (λ = K/B = 32, the authors' rates and rotation rule);
* ``drtune_defaults``   DR-Tune at the library defaults (λ 1, K 1024, backbone 0.01, head 0.1).

Every run: 64 px, batch 32, SGD, ``--steps`` optimiser steps (``train.steps``), the last epoch's model
tested once on the 10,000 test images; a fifth of the labels held out for validation. The table gives
each method's mean test top-1 ± standard error over seeds and its paired difference to ``ce_paper``
(mean of per-seed differences ± standard error; ``*`` where it exceeds 2σ). It also records the
self-supervised stage's kNN top-1 (start → end), its cost, and its images/s against a CE-tuning epoch
on the same images. Finished cells are written to ``--out`` as they finish and skipped by a rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drtune.backbones import data_config
from drtune.config import load_config
from drtune.data import ArraySplit, build_loader
from drtune.evaluation import evaluate
from drtune.pretrain import pretrain
from drtune.sources import few_label_splits, load_fashion_mnist
from drtune.train import fit

METHODS = ("linear_probe", "ce_paper", "ce_drtune_rates", "drtune_reference", "drtune_defaults")
BASE = ["model.name=tf_efficientnet_lite0", "train.image_size=64", "train.batch_size=32", "train.progress=false"]


def method_overrides(method: str) -> list[str]:
    """The fixed settings of one row (see the module docstring)."""
    if method == "linear_probe":
        return ["train.method=linear_probe", "train.lr_head=0.1"]
    if method == "ce_paper":
        return ["train.method=ce", "train.lr_backbone=0.01", "train.lr_head=0.01"]
    if method == "ce_drtune_rates":
        t = load_config(None, [*BASE, *method_overrides("drtune_reference")]).resolved().train
        rates = [f"train.lr_backbone={t.lr_backbone!r}", f"train.lr_head={t.lr_head!r}"]
        return ["train.method=ce", *rates, f"train.weight_decay={t.weight_decay!r}"]
    if method == "drtune_reference":
        return ["train.method=drtune", "drtune.preset=reference", "train.lr_backbone=0.01"]
    return ["train.method=drtune"]


def machine(device: str) -> dict:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "gpu": gpu, "torch": torch.__version__}


def ssl_backbone(args, train: ArraySplit, monitor: tuple[ArraySplit, ArraySplit], folder: Path) -> dict:
    """MoCo v2 on ``--ssl-images`` training images (a seeded sample, labels dropped); cached by its settings."""
    settings = [
        *BASE,
        "model.pretrained=bundled",
        f"pretrain.method={args.ssl_method}",
        "pretrain.init=weights",
        f"pretrain.epochs={args.ssl_epochs}",
        "pretrain.batch_size=64",
        "pretrain.lr=0.01",
        f"train.device={args.device}",
    ]
    key = hashlib.sha256(json.dumps([settings, args.ssl_images]).encode()).hexdigest()[:12]
    out = folder / f"ssl-{key}"
    record = out / "record.json"
    if record.is_file():
        return json.loads(record.read_text())
    chosen = np.random.default_rng(0).permutation(len(train))[: args.ssl_images]
    unlabelled = train.images[np.sort(chosen)]
    start = time.time()
    result = pretrain(load_config(None, settings), unlabelled, *monitor, 10, out, resume=True)
    wall = time.time() - start
    # CE-tuning's images/s on the same images, one epoch: the cost of a self-supervised image against it.
    ce = load_config(None, [*BASE, "model.pretrained=bundled", "train.method=ce", "train.epochs=1"])
    sample = ArraySplit(unlabelled, train.labels[np.sort(chosen)])
    ce_speed = fit(ce, sample, monitor[1], [str(c) for c in range(10)], out / "ce-speed", resume=False)
    info = {
        "path": str(out / "backbone.safetensors"),
        "method": args.ssl_method,
        "epochs": args.ssl_epochs,
        "images": len(unlabelled),
        "knn_top1_start": result.history[0]["knn_top1"],
        "knn_top1": result.history[-1]["knn_top1"],
        "history": result.history,
        "wall_s": round(wall, 1),
        "ssl_images_per_s": float(np.mean([h["images_per_s"] for h in result.history[1:]])),
        "ce_images_per_s": ce_speed.history[-1]["images_per_s"],
    }
    record.write_text(json.dumps(info, indent=1))
    return info


def run_cell(args, weights: str, method: str, seed: int, splits, test: ArraySplit, out: Path) -> dict:
    train, val = splits
    overrides = [*BASE, f"model.pretrained={weights}", f"train.seed={seed}", f"train.steps={args.steps}"]
    config = load_config(None, [*overrides, f"train.device={args.device}", *method_overrides(method)])
    start = time.time()
    result = fit(config, train, val, [str(c) for c in range(10)], out, resume=False)
    device = next(result.task.model.parameters()).device
    loader = build_loader(test, data_config(result.task.model.encoder), image_size=64, batch_size=256, train=False)
    scores = evaluate(result.task.model, loader, device, amp=device.type == "cuda")
    history = result.history
    return {
        "test_top1": scores["top1"],
        "val_top1_last": history[-1]["val_top1"],
        "val_top1_best": max(h["val_top1"] for h in history),
        "epochs": len(history),
        "wall_s": round(time.time() - start, 1),
        "device": str(device),
    }


def summarise(cells: dict, labels: list[int], backbones: list[str], seeds: list[int], n_test: int) -> tuple[str, dict]:
    """The table (text) and its numbers: mean ± s.e. per method, and the paired difference to ce_paper."""
    lines, numbers = [], {}
    for n in labels:
        for backbone in backbones:
            lines.append(f"\n{n} labels per class, {backbone} backbone (test top-1 on {n_test:,} images)")
            lines.append(f"{'method':<18} {'mean':>7} {'s.e.':>6}  {'vs ce_paper':>12} {'s.e.':>6}  seeds")
            ref = {s: cells.get(f"{n}/{backbone}/ce_paper/{s}") for s in seeds}
            for method in METHODS:
                got = {s: cells[k]["test_top1"] for s in seeds if (k := f"{n}/{backbone}/{method}/{s}") in cells}
                if not got:
                    continue
                values = np.array(list(got.values()))
                se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
                diffs = np.array([got[s] - ref[s]["test_top1"] for s in got if ref.get(s)])
                d = diffs.mean() if len(diffs) else float("nan")
                dse = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
                flag = "*" if len(diffs) > 1 and dse > 0 and abs(d) > 2 * dse else " "
                lines.append(f"{method:<18} {values.mean():7.4f} {se:6.4f}  {d:+12.4f} {dse:6.4f}{flag} {len(values)}")
                numbers[f"{n}/{backbone}/{method}"] = {"mean": values.mean(), "se": se, "diff": d, "diff_se": dse}
    return "\n".join(lines), numbers


def plot(numbers: dict, labels: list[int], backbones: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(n, b) for n in labels for b in backbones]
    fig, ax = plt.subplots(figsize=(max(8.0, 2.6 * len(groups) + 2), 4.6))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        rows = [numbers.get(f"{n}/{b}/{method}") for n, b in groups]
        xs = [g + i * width for g, r in enumerate(rows) if r]
        ax.bar(
            xs, [r["mean"] for r in rows if r], width, yerr=[np.nan_to_num(r["se"]) for r in rows if r], label=method
        )
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{n} labels/class\n{b}" for n, b in groups])
    ax.set_ylabel("test top-1 (Fashion-MNIST, 10,000 images)")
    ax.set_ylim(bottom=max(0.0, min((r["mean"] for r in numbers.values()), default=0) - 0.1))
    ax.legend(fontsize=8, ncol=len(METHODS), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    ax.set_title("Fixed settings; error bars: standard error over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default="10", help="labelled images per class, comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N-1 (label sample, split, training)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backbones", default="supervised,ssl")
    parser.add_argument("--ssl-method", default="moco", choices=("moco", "simclr"))
    parser.add_argument("--ssl-epochs", type=int, default=3)
    parser.add_argument("--ssl-images", type=int, default=10_000, help="unlabelled training images to pretrain on")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--out", default="bench/results/home_regime.json")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 2 methods, 256 SSL images, 1 epoch")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.ssl_images, args.ssl_epochs, args.test_images = 1, 20, 256, 1, 1000
        args.methods = "ce_paper,drtune_reference"
    labels = [int(x) for x in args.labels.split(",")]
    backbones, methods = args.backbones.split(","), args.methods.split(",")
    seeds = list(range(args.seeds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Checkpoints and the self-supervised backbone (not results to commit), apart for the smoke.
    work = Path("runs/bench") / (out.stem + ("-quick" if args.quick else ""))
    results = json.loads(out.read_text()) if out.is_file() else {"cells": {}}
    results.update(machine=machine(args.device), command=vars(args))

    raw = load_fashion_mnist("data/raw")
    test = ArraySplit(raw.test.images[: args.test_images], raw.test.labels[: args.test_images])
    splits = {
        (n, s): few_label_splits(raw, labels_per_class=n, label_fraction=None, val_fraction=0.2, seed=s)[:2]
        for n in labels
        for s in seeds
    }
    weights = {"supervised": "bundled"}
    if "ssl" in backbones:
        results["ssl"] = ssl_backbone(args, raw.train, splits[(max(labels), 0)], work)
        weights["ssl"] = results["ssl"]["path"]
        print(
            f"self-supervised backbone: kNN top-1 {results['ssl']['knn_top1_start']:.4f} → {results['ssl']['knn_top1']:.4f}"
        )
    todo = [(n, b, m, s) for s in seeds for n in labels for b in backbones for m in methods]
    for n, b, m, s in tqdm(todo, desc="cells"):
        key = f"{n}/{b}/{m}/{s}"
        if key in results["cells"]:
            continue
        results["cells"][key] = run_cell(args, weights[b], m, s, splits[(n, s)], test, work / key.replace("/", "-"))
        out.write_text(json.dumps(results, indent=1))
    table, numbers = summarise(results["cells"], labels, backbones, seeds, len(test))
    results["summary"] = numbers
    out.write_text(json.dumps(results, indent=1))
    print(table)
    plot(numbers, labels, backbones, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
