"""What each Ray Train worker runs for one trial: load the prepared splits, call ``drtune.train.fit``.

Every epoch the worker reports the (already all-reduced) validation metrics and, from rank 0, a
checkpoint holding ``last.pt``. When Ray Train restarts a worker group after a failure, or a
restored Tune experiment re-runs an unfinished trial, ``ray.train.get_checkpoint()`` returns the
trial's latest checkpoint; its ``last.pt`` is copied into the worker's scratch folder and ``fit``
continues from that epoch (model, optimiser, scheduler, banks, RNG).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import ray.train
import torch

from drtune.train import fit
from pipeline.prepare import load_prepared
from pipeline.settings import PipelineParams


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` = {"params": resolved params as a dict, "prepared": folder}."""
    params = PipelineParams.model_validate(config["params"])
    torch.set_num_threads(max(1, math.ceil(params.ray.cpus_per_worker)))
    train, val, _, classes, _ = load_prepared(config["prepared"])  # the test split is never touched here
    rank = ray.train.get_context().get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix=f"drtune-rank{rank}-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / "last.pt", scratch / "last.pt")

        def report(metrics: dict, checkpoint_path: Path) -> None:
            if rank != 0:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as staging:
                shutil.copy(checkpoint_path, Path(staging) / "last.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))

        fit(params, train, val, classes, scratch, report=report, resume=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
