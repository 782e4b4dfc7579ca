"""The pipeline's search on one GPU, alone or shared: 1, 4 and 8 trials at once on the same GPU.

    python bench/gpu_pipeline.py --prepared PREPARED_DIR --out OUT                 # on the GPU host (bench/gpu_pipeline.sh)
    python bench/gpu_pipeline.py --params configs/quick.yaml --shares 0 --prepared data/prepared   # CPU smoke run

For each share of a GPU per trial (``ray.gpus_per_worker``: 1, 0.25, 0.125) the ``tune`` stage runs the
default search (params.yaml: Lite0, Fashion-MNIST at 60 labels per class, 8 trials, ASHA) in a folder of
its own (``OUT/share-<g>/``: Ray storage, MLflow store, outputs), with ``tune.max_concurrent_trials`` =
1 / share and the host's CPUs split among the trials. Meanwhile ``nvidia-smi`` samples the GPU's
utilisation twice a second. Recorded per share: the search's wall time, the GPU utilisation over time
(mean and the series), each trial's training images/s (its epochs' ``images_per_s`` in MLflow), and the
pick's validation score. Each search runs under ``tune.time_budget_s`` (``--budget``), so the speed-up is in
trials completed per second of search, against the 1-trial search. Writes
OUT/gpu_pipeline.json, a table, and OUT/gpu_pipeline.png (utilisation over time) when matplotlib is there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class GpuSampler:
    """``nvidia-smi`` utilisation and memory every half second, in a thread; nothing without a GPU."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (seconds since start, utilisation %, memory MiB)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.time()
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self.stop.wait(0.5):
            try:
                util, memory = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split(",")[:2]
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return  # no GPU (a CPU smoke run)
            self.samples.append((round(time.time() - start, 1), float(util), float(memory)))

    def __enter__(self) -> GpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def trial_rates(tracking_uri: str) -> dict[str, float]:
    """Each trial's mean training images/s over its epochs, from its MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rates = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], filter_string="tags.`drtune.trial_id` != ''"):
            history = client.get_metric_history(run.info.run_id, "images_per_s")
            if history:
                rates[run.data.tags["drtune.trial_id"]] = sum(m.value for m in history) / len(history)
    return rates


def search(args, share: float, cpus: int) -> dict:
    """One ``tune`` stage at ``share`` GPUs per trial, in its own folder."""
    concurrent = max(1, round(1 / share)) if share > 0 else 0
    work = Path(args.out).resolve() / f"share-{share:g}"
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = [
        f"data.prepared_dir={Path(args.prepared).resolve()}",
        f"ray.gpus_per_worker={share:g}",
        f"ray.cpus_per_worker={max(1, cpus // max(concurrent, 1)) if share > 0 else 1}",
        f"tune.max_concurrent_trials={concurrent}",
        "tune.revalidate=never",  # the search's own cost: re-validation would add refits after it
        # a budget, not a kill: a search stopped by its budget picks among the trials that finished and writes
        # its outputs (pipeline/time_budget.py); a killed one writes nothing
        f"tune.time_budget_s={args.budget}",
        *args.set,
    ]
    env = dict(os.environ) | {
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "pipeline.tune", "--params", str(Path(args.params).resolve())]
    cmd += [x for s in sets for x in ("--set", s)]
    started = time.time()
    with GpuSampler() as gpu, (work / "tune.log").open("w") as log:
        stage = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = stage.wait(timeout=args.budget + 120)  # the budget, Ray's start and the stage's outputs
        except subprocess.TimeoutExpired:  # stuck: the stage and its private Ray are stopped, this share lost
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
            code = "timeout"
    wall = time.time() - started
    if code != 0:
        return {"share": share, "error": f"exit {code}: see {work / 'tune.log'}", "wall_s": round(wall, 1)}
    summary = json.loads((work / "metrics" / "tune.json").read_text())
    best = json.loads((work / "models" / "best.json").read_text())
    metric = best["metric"]
    rates = trial_rates(uri)
    utilisation = [u for _, u, _ in gpu.samples]
    return {
        "share": share,
        "trials_at_once": concurrent,
        "stage_wall_s": round(wall, 1),
        "search_wall_s": summary["wall_s"],
        "trials": summary["trials"],
        "completed": summary["completed"],
        f"best_val_{metric}": summary[f"best_val_{metric}"],
        "best_trial": best["best_trial"],
        "images_per_s_per_trial": rates,
        "mean_images_per_s_per_trial": sum(rates.values()) / len(rates) if rates else None,
        "gpu_utilisation_mean": sum(utilisation) / len(utilisation) if utilisation else None,
        "gpu_memory_peak_mib": max((m for *_, m in gpu.samples), default=None),
        "gpu_samples": gpu.samples,
    }


def plot(rows: list[dict], path: Path) -> None:
    if not any(r.get("gpu_samples") for r in rows):
        return  # no GPU was sampled
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in rows:
        if r.get("gpu_samples"):
            t, u, _ = zip(*r["gpu_samples"], strict=True)
            ax.plot(t, u, label=f"{r['trials_at_once']} trial(s) at once")
    ax.set(xlabel="seconds into the tune stage", ylabel="GPU utilisation %", ylim=(0, 100))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--prepared", required=True, help="a prepared data folder (python -m pipeline.prepare)")
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.25, 0.125])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--budget", type=float, default=100, help="tune.time_budget_s of each search (seconds)")
    parser.add_argument("--out", default="bench/results/gpu_pipeline")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for share in args.shares:
        rows.append(search(args, share, cpus))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "gpu_samples"}), flush=True)
        (out / "gpu_pipeline.json").write_text(json.dumps(rows, indent=1))  # kept if a later share is cut
    done = [r for r in rows if "error" not in r]
    reference = next((r for r in done if r["trials_at_once"] <= 1), None)

    # Searches end when their budget does, so speed is trials completed per second of search, not wall time.
    def rate(r: dict) -> float:
        return r["completed"] / r["search_wall_s"]

    print(
        f"\n{'trials at once':>14} {'search s':>9} {'completed':>9} {'speed-up':>9} {'GPU util %':>11} "
        f"{'img/s per trial':>16}  pick"
    )
    for r in done:
        speedup = rate(r) / rate(reference) if reference and reference["completed"] else float("nan")
        score = next(v for k, v in r.items() if k.startswith("best_val_"))
        util = r["gpu_utilisation_mean"]
        rate = r["mean_images_per_s_per_trial"]
        print(
            f"{r['trials_at_once']:>14} {r['search_wall_s']:>9.1f} {r['completed']:>9} {speedup:>9.2f} "
            f"{util if util is not None else float('nan'):>11.1f} {rate if rate is not None else float('nan'):>16.0f}"
            f"  {r['best_trial']} ({score:.4f})"
        )
    plot(done, out / "gpu_pipeline.png")


if __name__ == "__main__":
    main()
