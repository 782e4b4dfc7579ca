"""The search's overhead: its wall time against the pure training and validation it contains.

    python bench/overhead.py --set data.root=/usr/share/datasets            # the default problem, 4 trials
    python bench/overhead.py --params configs/quick.yaml --samples 2        # a smoke run

Runs the ``tune`` stage (``pipeline.tune.run``) on the same prepared split and settings twice, each in its own
process with its own private Ray, MLflow store and storage: once with Ray Train's default 2 s poll of its
workers, once with the pipeline's (``pipeline.cluster.TRAIN_POLL_S``). Same TPE seed, so the same trials. From
each trial's MLflow run it reads, per epoch, the training steps (``epoch_s``), the validation (``val_s``), the
checkpoint (``checkpoint_s``) and when the driver logged it; per trial the start-up (``startup_s``: from the
Train run's start to its first training step). Prints one table, the arms side by side, with the issue's goals:
search wall ≤ 1.25 × Σ(training + validation), each epoch as the driver sees it ≤ 1.1 × its training +
validation, start-up ≤ 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = {"2.0": "Ray's 2 s poll (before)", "0.25": "0.25 s poll (now)"}


def run_arm(params: str, overrides: list[str], prepared: Path, work: Path) -> dict:
    """In this process: the tune stage on ``prepared``, under ``work``; then its numbers from MLflow."""
    from mlflow.tracking import MlflowClient

    from pipeline import tune
    from pipeline.config import load
    from pipeline.mlflow_store import TRIAL_TAG

    uri = f"sqlite:///{work}/mlflow.db"
    p = load(params, [*overrides, f"data.prepared_dir={prepared}", f"mlflow.tracking_uri={uri}"])
    p.ray.storage_path = str(work / "ray")
    summary = tune.run(p, work)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(p.mlflow_experiment()).experiment_id
    trials = []
    for run in client.search_runs([experiment], filter_string=f"tags.`{TRIAL_TAG}` != ''"):
        series = {
            key: {m.step: m for m in client.get_metric_history(run.info.run_id, key)}
            for key in ("epoch_s", "val_s", "checkpoint_s", "startup_s")
        }
        epochs = sorted(series["epoch_s"])
        compute = [series["epoch_s"][e].value + series["val_s"][e].value for e in epochs]
        seen = [  # the driver's clock between two epochs' results: the epoch as the search pays for it
            (series["epoch_s"][b].timestamp - series["epoch_s"][a].timestamp) / 1000
            for a, b in zip(epochs, epochs[1:], strict=False)
        ]
        trials.append(
            {
                "epochs": len(epochs),
                "compute_s": sum(compute),
                "checkpoint_s": sum(m.value for m in series["checkpoint_s"].values()),
                "startup_s": series["startup_s"][1].value if 1 in series["startup_s"] else None,
                "epoch_ratios": [s / c for s, c in zip(seen, compute[1:], strict=True)],
            }
        )
    return {"wall_s": summary["wall_s"], "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"), type=lambda v: str(Path(v).resolve()))
    parser.add_argument("--samples", type=int, default=4, help="tune.num_samples of each search")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = [*args.set, f"tune.num_samples={args.samples}", "tune.revalidate=never", "tune.time_budget_s=null"]
    if args.arm:  # a child: one arm, its JSON on the last line
        print(json.dumps(run_arm(args.params, overrides, Path(args.prepared), Path(args.work))))
        return

    from drtune.prepared import write_prepared
    from pipeline.config import load

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        data = load(args.params, args.set).data.model_copy()
        data.prepared_dir = str(prepared)
        write_prepared(data)
        rows = {}
        for poll, name in ARMS.items():
            work = Path(tmp) / f"poll-{poll}"
            work.mkdir()
            env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll
            cmd = [sys.executable, __file__, "--arm", poll, "--params", args.params, "--samples", str(args.samples)]
            cmd += [f"--set={s}" for s in args.set] + ["--work", str(work), "--prepared", str(prepared)]
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: done", flush=True)
    print(
        "\n| arm | trials | epochs | search wall (s) | Σ train + val (s) | wall ÷ it (goal ≤ 1.25) "
        "| epoch seen ÷ train + val, median (goal ≤ 1.1) | Σ checkpoints (s) | start-up mean / max (s, goal ≤ 5) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["trials"]
        compute = sum(x["compute_s"] for x in t)
        ratios = [q for x in t for q in x["epoch_ratios"]]
        startups = [x["startup_s"] for x in t if x["startup_s"] is not None]
        print(
            f"| {name} | {len(t)} | {sum(x['epochs'] for x in t)} | {r['wall_s']:.1f} | {compute:.1f} "
            f"| {r['wall_s'] / compute:.2f} | {statistics.median(ratios):.2f} "
            f"| {sum(x['checkpoint_s'] for x in t):.1f} | {statistics.mean(startups):.1f} / {max(startups):.1f} |"
        )


if __name__ == "__main__":
    main()
