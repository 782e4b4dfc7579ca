"""Data scale: how each method's test accuracy falls as labels get scarce (the paper's Table 5 regime).

    python bench/datascale.py                                   # the run reported in the README
    python bench/datascale.py --labels 10 30 100 300 --epochs 40 --image-size 64   # the full grid (GPU-sized)
    python bench/datascale.py --quick                           # digits + a tiny random model: a smoke check

ImageNet Lite0 (bundled weights) → Fashion-MNIST with ``--labels`` labelled images per class (a fifth of
them held out for validation). The schedule is long on purpose (``--epochs``, the same for every
method and scale): the paper's claim is that CE-tuning overfits a few labels over a long schedule
and DR-Tune's regulariser holds it back. The CE runs' training loss and validation top-1 per epoch
are kept so the plot shows whether that overfitting happens here.

For each scale and method (CE-tuning, linear probe, L2-SP, DR-Tune, DR-Tune with cached pretrained
features) the pipeline's own search (Ray Tune, Optuna TPE, ASHA; :func:`pipeline.search.build_tuner`)
runs the same number of trials over that method's hyperparameters, starting from the method's
defaults, and picks on validation; the chosen setting is then trained with 3 seeds and each
seed's last-epoch model is tested once on the 10,000 test images.

Resumable: every search and run is written to ``bench/results/datascale[-quick].json`` as it
finishes and skipped on the next invocation; an interrupted search resumes (Tuner.restore).
Settings are stored with the results; running with different ones refuses unless ``--restart``.
``python bench/report.py datascale`` prints the table; the plot is ``bench/results/datascale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from accuracy import DEFAULT_POINTS, search
from report import datascale as print_table

from drtune.backbones import data_config
from drtune.config import Config
from drtune.data import build_loader
from drtune.evaluation import evaluate
from drtune.prepared import load_prepared, write_prepared
from drtune.train import fit
from pipeline.cluster import start_ray
from pipeline.config import PipelineConfig, load
from pipeline.search import trial_config

METHODS = ["ce", "linear_probe", "l2sp", "drtune", "drtune-cached"]
RESULTS = Path(__file__).parent / "results"


def method_config(base: PipelineConfig, method: str) -> PipelineConfig:
    """``base`` set up to search ``method``, starting from its library defaults (:data:`DEFAULT_POINTS`)."""
    p = base.model_copy(deep=True)
    p.train.method = "drtune" if method.startswith("drtune") else method
    p.drtune.pretrained_features = "cached" if method == "drtune-cached" else "online"
    point = dict(DEFAULT_POINTS["drtune" if method.startswith("drtune") else method])
    if "queue_size" in point and point["queue_size"] not in p.tune.queue_sizes:
        point["queue_size"] = p.tune.queue_sizes[-1]
    p.tune.points_to_evaluate = [point]
    return p


def train_and_test(config: Config, work: Path, name: str) -> dict:
    """One seed: fit (history kept: the overfitting evidence), then the last epoch's model tested once."""
    started = time.time()
    data = load_prepared(work / config.data.prepared_dir)
    result = fit(config, data.train, data.val, data.classes, work / "runs" / name, resume=True)
    model = result.task.inference_model()
    loader = build_loader(data.test, data_config(model.encoder), config.train.image_size, 256, train=False)
    test = evaluate(model, loader, next(model.parameters()).device)
    curve = [{k: h[k] for k in ("epoch", "train_loss", "train_ce", "val_top1", "val_loss")} for h in result.history]
    return {"val_top1": curve[-1]["val_top1"], "test_top1": test["top1"], "history": curve,
            "wall_s": round(time.time() - started, 1)}


def settings(args: argparse.Namespace) -> list[str]:
    """The overrides every cell shares: the schedule, the image size and the equal search budget (ASHA:
    every trial gets a third of the schedule, the top third of the trials go on to the end)."""
    grace = max(1, args.epochs // 3)
    return [f"train.epochs={args.epochs}", f"train.image_size={args.image_size}", f"tune.num_samples={args.trials}",
            f"tune.grace_period={grace}", "tune.reduction_factor=3", "tune.startup_trials=1",
            "train.progress=false", "ray.cpus_per_worker=2"]


def plot(results: dict, path: Path) -> None:
    """Left: test top-1 against labels per class (mean ± std over seeds). Right: CE-tuning's training
    loss and validation top-1 per epoch at the smallest scale, beside DR-Tune's (the overfitting picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted(results["cells"], key=int)
    fig, (acc, curve) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        xs, means, stds = [], [], []
        for n in cells:
            tests = [r["test_top1"] for k, r in results["cells"][n]["runs"].items() if k.split("/")[0] == method]
            if tests:
                xs.append(int(n))
                means.append(np.mean(tests))
                stds.append(np.std(tests, ddof=1) if len(tests) > 1 else 0.0)
        if xs:
            acc.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    acc.set(xscale="log", xlabel="labelled images per class (a fifth held out for validation)", ylabel="test top-1",
            title="Lite0 → Fashion-MNIST")
    acc.set_xticks([int(n) for n in cells], labels=cells)
    acc.grid(alpha=0.3)
    acc.legend()
    smallest = results["cells"][cells[0]]["runs"] if cells else {}
    twin = curve.twinx()
    for method, colour in (("ce", "tab:blue"), ("drtune", "tab:red")):
        run = smallest.get(f"{method}/seed0")
        if run:
            epochs = [h["epoch"] for h in run["history"]]
            curve.plot(epochs, [h["train_ce"] for h in run["history"]], color=colour, ls="--", label=f"{method}: train CE")
            twin.plot(epochs, [h["val_top1"] for h in run["history"]], color=colour, label=f"{method}: validation top-1")
    curve.set(xlabel="epoch", ylabel="training cross-entropy", yscale="log",
              title=f"{cells[0] if cells else '?'} labels per class, seed 0")
    twin.set_ylabel("validation top-1")
    lines = curve.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    curve.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 30], help="labelled images per class")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=4, help="search trials per method and scale")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--restart", action="store_true", help="discard stored results made with other settings")
    args = parser.parse_args()
    if args.quick:
        args.labels, args.epochs, args.image_size, args.trials, args.seeds = [10, 30], 3, 16, 2, [0, 1]
    tag = "datascale-quick" if args.quick else "datascale"
    work = (Path("runs/bench") / tag).resolve()
    results_path = RESULTS / f"{tag}.json"
    overrides = settings(args)
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    if results is not None and results["settings"] != overrides:
        if not args.restart:
            raise SystemExit(f"{results_path} was made with {results['settings']}, not {overrides}; "
                             "pass the same settings, or --restart to discard it")
        results = None
        shutil.rmtree(work, ignore_errors=True)
    results = results or {"settings": overrides, "cells": {}, "wall_s": 0.0}
    results["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs"

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))

    base = load("configs/quick.yaml" if args.quick else "params.yaml", overrides)
    base.ray.storage_path = str(work / "ray")
    start_ray(base)
    for n in sorted(args.labels):
        cell = results["cells"].setdefault(str(n), {"searches": {}, "runs": {}})
        cell_base = base.model_copy(deep=True)
        cell_base.data.labels_per_class = n
        cell_base.data.prepared_dir = f"data/prepared-{n}"
        if not (work / cell_base.data.prepared_dir / "stats.json").exists():
            prepared = cell_base.data.model_copy()
            prepared.prepared_dir = str(work / cell_base.data.prepared_dir)
            write_prepared(prepared)
        for method in args.methods:
            p = method_config(cell_base, method)
            if method not in cell["searches"]:
                started = time.time()
                cell["searches"][method] = search(p, work, f"search-{n}-{method}")
                results["wall_s"] += time.time() - started
                save()
            chosen = trial_config(p, cell["searches"][method]["config"])
            for seed in args.seeds:
                key = f"{method}/seed{seed}"
                if key not in cell["runs"]:
                    chosen.train.seed = seed
                    started = time.time()
                    cell["runs"][key] = train_and_test(chosen, work, f"{n}-{method}-seed{seed}")
                    results["wall_s"] += time.time() - started
                    save()
                    print(f"{n} labels/class {key}: test top-1 {cell['runs'][key]['test_top1']:.4f}", flush=True)
            plot(results, RESULTS / f"{tag}.png")
    save()
    print_table(results)


if __name__ == "__main__":
    main()
