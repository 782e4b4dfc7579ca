"""A Ray Train run's fixed cost: what it pays before its training function starts and after it returns, with
the workers' environment set through a ``runtime_env`` (as the pipeline did) or inherited from the driver, with
Ray Train's default 2 s poll of the workers or the pipeline's (``pipeline.cluster.TRAIN_POLL_S``).

    python bench/worker_startup.py --runs 6

Each form runs in its own process with its own private Ray (2 CPUs): ``--runs`` Ray Train runs one after
the other, each one worker whose loop reports once and returns, as a trial's Train run starts and ends.
The time from ``TorchTrainer.fit()`` to its return is the fixed cost every trial and every re-validation
pays on top of its epochs, split into the time until the training function starts and the time from its
end to ``fit()``'s return (the worker group's teardown). The first run warms Ray up and is reported apart.
Prints one table, the three forms side by side, and the ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMS = {
    "runtime_env": "runtime_env, 2 s poll (before)",
    "driver_env_ray_poll": "driver env, 2 s poll",
    "driver_env": "driver env, 0.25 s poll (now)",
}


def one_form(form: str, runs: int) -> dict:
    """Start a private Ray the ``form`` way and time ``runs`` minimal Train runs; returns the seconds of each."""
    import ray
    from ray import train
    from ray.train.torch import TorchTrainer

    from pipeline import cluster
    from pipeline.config import load

    config = load(None, ["ray.num_cpus=2"])
    if form == "driver_env":  # the pipeline now
        cluster.start_ray(config)
    else:
        env = cluster.worker_environment(config) | {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}  # Ray's default
        if form == "driver_env_ray_poll":
            os.environ.update(env)
        ray.init(
            address="local",
            num_cpus=2,
            resources={cluster.DRIVER_RESOURCE: 10_000},
            runtime_env={"env_vars": env} if form == "runtime_env" else None,  # the pipeline before
            log_to_driver=False,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )

    def loop(stamps: dict) -> None:
        Path(stamps["start"]).write_text(str(time.time()))  # same machine: wall clocks compare
        train.report({"ready": 1.0})
        Path(stamps["end"]).write_text(str(time.time()))

    seconds, to_loop, after_loop = [], [], []
    with tempfile.TemporaryDirectory() as storage:
        stamps = {"start": f"{storage}/start", "end": f"{storage}/end"}
        for i in range(runs):
            started = time.time()
            TorchTrainer(
                loop,
                train_loop_config=stamps,
                scaling_config=train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                run_config=train.RunConfig(name=f"run{i}", storage_path=storage),
            ).fit()
            ended = time.time()
            seconds.append(ended - started)
            to_loop.append(float(Path(stamps["start"]).read_text()) - started)
            after_loop.append(ended - float(Path(stamps["end"]).read_text()))
    ray.shutdown()
    return {"form": form, "seconds": seconds, "to_loop": to_loop, "after_loop": after_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--form", choices=list(FORMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.form:  # a child: one form, its JSON on the last line
        print(json.dumps(one_form(args.form, args.runs)))
        return
    rows = {}
    for form in FORMS:
        done = subprocess.run(
            [sys.executable, __file__, "--form", form, "--runs", str(args.runs)], capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        rows[form] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "| workers' environment | first run (s) | later runs, mean (s) | fit → loop starts | loop ends → fit returns "
        "| × before |"
    )
    print("|---|---|---|---|---|---|")
    base = statistics.mean(rows["runtime_env"]["seconds"][1:])
    for form, r in rows.items():
        later = statistics.mean(r["seconds"][1:])
        print(
            f"| {FORMS[form]} | {r['seconds'][0]:.2f} | {later:.2f} | {statistics.mean(r['to_loop'][1:]):.2f} "
            f"| {statistics.mean(r['after_loop'][1:]):.2f} | {later / base:.2f} |"
        )


if __name__ == "__main__":
    main()
