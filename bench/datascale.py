"""Data scale: how each method's test accuracy falls as labels get scarce (the paper's Table 5 regime).

    python bench/datascale.py --workers 15                                   # one GPU box (the README's run)
    python bench/datascale.py --labels 10 --steps 200 --out /tmp/datascale   # this CPU: one short cell
    python bench/datascale.py --quick                                        # digits + a tiny random model

ImageNet Lite0 (bundled weights) → Fashion-MNIST with ``--labels`` labelled images per class (a fifth
held out for validation, stratified). Every run takes the same number of optimiser steps
(``--steps``, batch 32), whatever the scale: 600 steps are 300 epochs over 10 labels per class
and 8 over 300. The schedule is long on purpose: the paper's claim is that CE-tuning overfits a
few labels and DR-Tune's regulariser holds it back, so every run keeps its training loss and
validation curve per epoch, and the plot shows whether that overfitting happens.

Each method (CE-tuning, linear probe, L2-SP, DR-Tune, DR-Tune with cached pretrained features)
gets the same search at every scale: ``--trials`` runs, the first at the config's own values (the
library defaults), for DR-Tune the second at the authors' effective setting (:func:`reference_point`:
λ = K/B, their rates and weight decay; λ's range reaches K/B), the others drawn from the method's own ranges in ``params.yaml``'s ``tune``
section (:func:`pipeline.space.random_point`: log-uniform rates, λ and α/β, a choice of K). All
run the whole schedule (no early stopping) and the pick is the best last-epoch validation top-1
(ties: lower validation loss). The chosen setting is trained again with the other ``--seeds``;
its own search run is seed 0. Every run's last-epoch model is tested once on the 10,000 test
images (test never enters the pick).

Runs are independent fits, so they go to a pool of ``--workers`` processes (on one GPU they share
the card: a Lite0 step at 64 px is too small to fill it). No Ray: this script runs where only
torch, timm and pydantic are installed, such as a bare GPU machine. Finished runs are written to
``--out``/datascale[-quick].json as they finish and skipped by the next invocation; ``--deadline``
stops starting runs after that many seconds. Settings are stored with the results; other
settings are refused unless ``--restart``. ``python bench/report.py datascale`` prints the tables;
the plot is ``datascale[-quick].png`` beside the JSON.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from report import datascale as print_table

from drtune.backbones import data_config
from drtune.config import Config
from drtune.data import build_loader
from drtune.evaluation import evaluate
from drtune.prepared import PreparedData, load_prepared, prepared_stats, write_prepared
from drtune.train import DivergedError, fit
from pipeline.config import PipelineConfig, load
from pipeline.selection import Candidate, rank
from pipeline.space import random_point, starting_points, trial_config

# Each row: a method of drtune.methods, or ``<method>-cached`` (DR-Tune with cached pretrained features).
METHODS = ["ce", "linear_probe", "l2sp", "drtune", "drtune-cached"]
KEPT = ("epoch", "train_loss", "train_ce", "val_top1", "val_loss")  # per-epoch history kept for the curves


def method_config(base: PipelineConfig, row: str) -> PipelineConfig:
    """``base`` set up to search ``row``'s method; its first point is the config's own values."""
    p = base.model_copy(deep=True)
    p.train.method = row.removesuffix("-cached")
    p.drtune.pretrained_features = "cached" if row.endswith("-cached") else "online"
    p.tune.points_to_evaluate = [{}]
    if p.train.method == "drtune":  # λ's range reaches the reference's K/B (the authors' λ is 8–32)
        p.tune.lam.high = max(p.tune.lam.high, reference_point(p)["lam"])
    return p


def reference_point(p: PipelineConfig) -> dict:
    """DR-Tune's ``preset: reference`` as the numbers it resolves to, at the largest queue size: λ = K/B, the
    authors' rates (backbone r/(1 + K/B), head r) and weight decay × (1 + K/B)."""
    ref = p.library()
    ref.train.method, ref.drtune.preset, ref.drtune.queue_size = "drtune", "reference", max(p.tune.queue_sizes)
    r = ref.resolved()
    keys = ("train.lr_backbone", "train.lr_head", "train.weight_decay", "drtune.lam", "drtune.queue_size")
    return {k.split(".")[1]: getattr(getattr(r, k.split(".")[0]), k.split(".")[1]) for k in keys}


def search_points(p: PipelineConfig, trials: int, labels: int, method: str) -> list[dict]:
    """The equal search: the config's values, for DR-Tune the reference's effective setting
    (:func:`reference_point`), then seeded draws from the method's ranges up to ``trials``."""
    rng = random.Random(f"{labels}/{method}")
    points = starting_points(p)[:1] + ([reference_point(p)] if p.train.method == "drtune" else [])
    return points + [random_point(p, rng) for _ in range(trials - len(points))]


def epochs_for(steps: int, train_images: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimiser steps (the last partial batch is dropped)."""
    return math.ceil(steps / max(1, train_images // batch_size))


@dataclass(order=True)
class Job:
    """One fit. Ordered so that smaller scales finish first and a cell's seeds go before the next
    cell's search: an interrupted or deadline-cut run leaves whole cells (``--first`` methods go first)."""

    rank: int  # 0: a --first method, 1: the others
    labels: int
    phase: int  # 0: search trial, 1: seed of the chosen setting
    method_index: int
    index: int  # trial number or seed
    method: str = field(compare=False)
    config: Config = field(compare=False)
    point: dict = field(compare=False)

    @property
    def key(self) -> str:
        return f"{self.method}/{'trial' if self.phase == 0 else 'seed'}{self.index}"


_CACHE: dict[str, object] = {}  # per pool process: the prepared split and the test batches in GPU memory


def _worker_init() -> None:
    torch.set_num_threads(1)  # the pool shares the machine's cores; the steps run on the GPU


def _test_batches(
    prepared: str, data: PreparedData, model: torch.nn.Module, image_size: int, device: torch.device
) -> list:
    """The test split through the eval transform once per process (half precision on the device),
    instead of 10,000 CPU transforms for every run."""
    key = f"{prepared}@{image_size}"
    if _CACHE.get("test_key") != key:
        loader = build_loader(data.test, data_config(model.encoder), image_size, 256, train=False)
        _CACHE["test"] = [(x.to(device, torch.float16), y.to(device)) for x, y, *_ in loader]
        _CACHE["test_key"] = key
    return _CACHE["test"]


def run_job(config: Config, prepared: str, out: str) -> dict:
    """Fit one run (resuming its checkpoint if an earlier invocation was cut), test its last epoch."""
    started = time.time()
    if _CACHE.get("data_key") != prepared:
        _CACHE["data"], _CACHE["data_key"] = load_prepared(prepared), prepared
    data: PreparedData = _CACHE["data"]
    config = config.model_copy(deep=True)
    config.train.checkpoint_every = max(1, config.train.epochs // 5)
    try:
        result = fit(config, data.train, data.val, data.classes, out, resume=True)
    except DivergedError as err:
        return {"diverged": str(err), "val_top1": 0.0, "val_loss": math.inf, "wall_s": round(time.time() - started, 1)}
    model = result.task.inference_model()
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    batches = _test_batches(prepared, data, model, config.train.image_size, device)
    test = evaluate(model, ((x.float(), y) for x, y in batches), device)
    history = [{k: round(h[k], 5) for k in KEPT} for h in result.history]
    last = result.history[-1]
    return {
        "val_top1": last["val_top1"],
        "val_loss": last["val_loss"],
        "test_top1": test["top1"],
        "epochs": last["epoch"],
        "images_per_s": round(sum(h["images_per_s"] for h in result.history) / len(history), 1),
        "history": history,
        "device": where,
        "wall_s": round(time.time() - started, 1),
    }


def chosen_trial(trials: dict[str, dict]) -> str:
    """The trial :func:`pipeline.selection.rank` puts first: the best last-epoch validation top-1; ties: lower
    validation loss, then the earlier trial."""
    order = sorted(trials, key=lambda k: int(k.rsplit("trial", 1)[1]))
    return rank(
        [
            Candidate(id=k, method="", val_score=trials[k]["val_top1"], val_loss=trials[k]["val_loss"], n_val=1)
            for k in order
        ]
    )[0].id


def plot(results: dict, path: Path) -> None:
    """Left: test top-1 against labels per class (mean ± std over seeds). Right: CE-tuning's and
    DR-Tune's training CE and validation loss per epoch at the smallest scale (the overfitting picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted(results["cells"], key=int)
    fig, (acc, curve) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        xs, means, stds = [], [], []
        for n in cells:
            tests = [
                r["test_top1"]
                for k, r in results["cells"][n]["runs"].items()
                if k.split("/")[0] == method and "test_top1" in r
            ]
            if tests:
                xs.append(int(n))
                means.append(np.mean(tests))
                stds.append(np.std(tests, ddof=1) if len(tests) > 1 else 0.0)
        if xs:
            acc.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    acc.set(
        xscale="log",
        xlabel="labelled images per class (a fifth held out for validation)",
        ylabel="test top-1",
        title=f"Lite0 → Fashion-MNIST, {results['settings']['steps']} steps per run",
    )
    acc.set_xticks([int(n) for n in cells], labels=cells)
    acc.grid(alpha=0.3)
    acc.legend()
    smallest = results["cells"][cells[0]]["runs"] if cells else {}
    window = 10  # epochs of 2 steps over 80 images are noisy: a running mean shows the trend
    for method, colour in (("ce", "tab:blue"), ("drtune", "tab:red")):
        run = smallest.get(f"{method}/seed0")
        if run and len(run.get("history", [])) >= window:
            epochs = [h["epoch"] for h in run["history"]][window - 1 :]
            for key, style, what in (("train_ce", "--", "training CE"), ("val_loss", "-", "validation loss")):
                smooth = np.convolve([h[key] for h in run["history"]], np.ones(window) / window, mode="valid")
                curve.plot(epochs, smooth, color=colour, ls=style, label=f"{method}: {what}")
    curve.set(
        xlabel="epoch",
        ylabel=f"cross-entropy ({window}-epoch running mean)",
        yscale="log",
        title=f"{cells[0] if cells else '?'} labels per class, seed 0: does it overfit?",
    )
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 30, 100, 300], help="labelled images per class")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per run, at every scale")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--trials", type=int, default=4, help="search runs per method and scale")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seed 0 is the chosen search run")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--first",
        nargs="+",
        default=[],
        choices=METHODS,
        help="methods whose runs, at every scale, start before any other method's",
    )
    parser.add_argument("--workers", type=int, default=1, help="concurrent runs (processes)")
    parser.add_argument("--deadline", type=float, default=math.inf, help="seconds after which no run is started")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--work", type=Path, default=None, help="checkpoints and prepared data (default runs/bench/<tag>)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--restart", action="store_true", help="discard stored results made with other settings")
    args = parser.parse_args()
    if args.quick:
        args.labels, args.steps, args.image_size, args.trials, args.seeds = [10, 30], 12, 16, 2, [0, 1]
    begun = time.time()
    tag = "datascale-quick" if args.quick else "datascale"
    work = (args.work or Path("runs/bench") / tag).resolve()
    results_path = args.out / f"{tag}.json"
    settings = {
        "steps": args.steps,
        "image_size": args.image_size,
        "trials": args.trials,
        "batch_size": 32,
        "drtune_starts_at_reference": True,
    }
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    if results is not None and results["settings"] != settings:
        if not args.restart:
            raise SystemExit(
                f"{results_path} was made with {results['settings']}, not {settings}; "
                "pass the same settings, or --restart to discard it"
            )
        results = None
        shutil.rmtree(work, ignore_errors=True)
    results = results or {"settings": settings, "cells": {}, "wall_s": 0.0, "machines": {}}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {gpu}" if gpu else "")
        + f", {args.workers} concurrent runs"
    )
    earlier_s = results["machines"].get(machine, 0.0)  # wall time of earlier invocations on this machine kind

    def save() -> None:
        results["machines"][machine] = round(earlier_s + time.time() - begun, 1)
        results["wall_s"] = round(sum(results["machines"].values()), 1)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
        plot(results, args.out / f"{tag}.png")

    overrides = [
        f"train.image_size={args.image_size}",
        "train.batch_size=32",
        "train.progress=false",
        "train.num_workers=0",
    ]
    base = load("configs/quick.yaml" if args.quick else "params.yaml", overrides)
    base.train.seed = 0  # the search runs are seed 0 of the chosen setting
    queue: list[Job] = []
    searches: dict[tuple[int, str], PipelineConfig] = {}
    for n in sorted(args.labels):
        cell = results["cells"].setdefault(str(n), {"searches": {}, "trials": {}, "runs": {}})
        prepared = base.data.model_copy()
        prepared.labels_per_class, prepared.prepared_dir = n, str(work / f"data/prepared-{n}")
        if not (work / prepared.prepared_dir / "stats.json").exists():
            write_prepared(prepared)
        cell_base = base.model_copy(deep=True)
        cell_base.data = prepared
        cell_base.train.epochs = epochs_for(
            args.steps, sum(prepared_stats(prepared.prepared_dir)["counts"]["train"]), 32
        )
        for m, method in enumerate(args.methods):
            p = searches[n, method] = method_config(cell_base, method)
            for k, point in enumerate(search_points(p, args.trials, n, method)):
                if f"{method}/trial{k}" not in cell["trials"]:
                    queue.append(Job(int(method not in args.first), n, 0, m, k, method, trial_config(p, point), point))
    heapq.heapify(queue)

    def seeds_when_searched(n: int, method: str) -> None:
        """Once every trial of (n, method) is in, pick and queue the other seeds of the chosen setting."""
        cell = results["cells"][str(n)]
        trials = {k.split("/")[1]: r for k, r in cell["trials"].items() if k.split("/")[0] == method}
        if len(trials) < args.trials:
            return
        best = chosen_trial(trials)
        cell["searches"][method] = {"trial": best, "point": trials[best]["point"], "val_top1": trials[best]["val_top1"]}
        cell["runs"][f"{method}/seed0"] = trials[best]
        for seed in args.seeds:
            if seed != 0 and f"{method}/seed{seed}" not in cell["runs"]:
                config = trial_config(searches[n, method], trials[best]["point"])
                config.train.seed = seed
                rank = int(method not in args.first)
                heapq.heappush(
                    queue, Job(rank, n, 1, args.methods.index(method), seed, method, config, trials[best]["point"])
                )

    for n, method in searches:
        seeds_when_searched(n, method)
    errors = []
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    running: dict = {}
    try:
        while queue or running:
            while queue and len(running) < args.workers and time.time() - begun < args.deadline:
                job = heapq.heappop(queue)
                out = work / "runs" / f"{job.labels}-{job.key.replace('/', '-')}"
                running[pool.submit(run_job, job.config, str(work / f"data/prepared-{job.labels}"), str(out))] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                cell = results["cells"][str(job.labels)]
                try:
                    record = {**future.result(), "point": job.point}
                except Exception as err:  # noqa: BLE001 — kept and reported; the other runs go on
                    errors.append(f"{job.labels} labels/class {job.key}: {type(err).__name__}: {err}")
                    print(errors[-1], flush=True)
                    continue
                (cell["trials"] if job.phase == 0 else cell["runs"])[job.key] = record
                print(
                    f"{time.time() - begun:6.0f} s  {job.labels} labels/class {job.key}: val {record['val_top1']:.3f} "
                    f"test {record.get('test_top1', float('nan')):.4f} ({record['wall_s']:.0f} s, "
                    f"{record.get('images_per_s', 0):.0f} img/s)",
                    flush=True,
                )
                if job.phase == 0:
                    seeds_when_searched(job.labels, job.method)
                save()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    save()
    print_table(results)
    if queue or errors:
        print(f"\nnot finished: {len(queue)} runs never started (deadline), {len(errors)} failed: {errors}")


if __name__ == "__main__":
    main()
