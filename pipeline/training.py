"""One Ray Train run of :func:`drtune.train.fit`: what each worker runs, how the run is launched and named.

    run_training ── TorchTrainer.fit() ── ``ray.workers_per_trial`` workers, each running
                                          train_loop_per_worker (gloo, or nccl on GPUs)

The prepared splits travel through Ray's object store (:func:`share_data`), never through the
driver's disk, so a worker on another node reads nothing the driver wrote. The device is the one
Ray Train assigned the worker (``ray.train.torch.get_device``). Every epoch the worker reports the
(already all-reduced) validation metrics, which Tune and ASHA see, and, from rank 0 on the epochs
``fit`` wrote one (every ``train.checkpoint_every`` epochs, and the last), a checkpoint holding
``last.pt``, stored under ``ray.storage_path`` (a local folder or an ``s3://`` / ``gs://`` URI).
When Ray Train restarts a worker group after a failure, or a restored Tune experiment re-runs an
unfinished trial, ``ray.train.get_checkpoint()`` returns the trial's latest checkpoint and ``fit``
continues from it; that attempt's first report carries ``resumed_from_epoch``, so the restart
shows in the trial's MLflow run.

Ray Train restarts a worker group (up to ``ray.max_failures`` times) for any error, but only a lost
worker or node is worth it: a loss that became NaN would become NaN again. So a divergence is not
raised; the workers report it as the run's last result (``diverged`` 1, validation top-1 NaN) and
end, and the trial ends failed, once.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

import drtune
from drtune import methods
from drtune.config import Config
from drtune.evaluation import METRIC_NAMES
from drtune.folds import extra_fold
from drtune.prepared import PreparedData
from drtune.train import DivergedError, fit
from pipeline import faults
from pipeline.config import PipelineConfig
from pipeline.early_stopping import rung_epochs


@dataclass(frozen=True)
class SharedData:
    """A handle on the training and validation splits in Ray's object store.

    A plain ObjectRef handed to ``tune.with_parameters`` would be fetched by every trial driver
    and then copied into each Train run's config; this small handle travels instead, and only
    the workers fetch the arrays (once each, from the object store of their node).
    """

    ref: ray.ObjectRef

    def get(self) -> dict:
        return ray.get(self.ref)


def share_data(data: PreparedData, weights: dict[str, bytes] | None = None) -> SharedData:
    """Put the training and validation splits in Ray's object store (the test split stays with the driver),
    with ``weights``, the bytes of the weight files the runs start from, by the ``model.pretrained`` that names
    each (the pretrain stage's backbone, ``tune.models``' checkpoints): a worker on another node has not the
    driver's disk."""
    shared = {"train": data.train, "val": data.val, "classes": data.classes, "weights": weights or {}}
    return SharedData(ray.put(shared))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config`` = {"config": the trial's :class:`Config`, "data": :class:`SharedData`,
    "threads": torch threads, "fold": 0 for the prepared split, j ≥ 1 for :func:`drtune.folds.extra_fold` j,
    "specs": the method's spec, by value (:func:`drtune.methods.adopt`), "launched": when the run was started,
    "validate_at": the epochs validated whatever ``train.validate_every`` says (ASHA's rungs)}."""
    methods.adopt(loop_config["specs"])
    config: Config = loop_config["config"]
    torch.set_num_threads(max(1, math.ceil(loop_config["threads"])))
    data = loop_config["data"].get()
    train, val = data["train"], data["val"]
    if loop_config["fold"]:
        train, val = extra_fold(train, val, loop_config["fold"], config.data.seed)
    rank = ray.train.get_context().get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix=f"drtune-rank{rank}-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        restarted = checkpoint is not None
        if restarted:
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / "last.pt", scratch / "last.pt")
        device = ray.train.torch.get_device()
        psutil.cpu_percent()  # starts the CPU-time window the first epoch's reading covers

        def report(metrics: dict, checkpoint_path: Path | None) -> None:
            nonlocal restarted
            if restarted:  # this attempt's first report
                metrics = metrics | {"resumed_from_epoch": float(metrics["epoch"] - 1)}
                restarted = False
            elif metrics["epoch"] == 1:  # the run's fixed start-up: Ray, the workers, the model, the data
                spent = sum(metrics.get(k, 0.0) for k in ("epoch_s", "val_s", "checkpoint_s"))
                metrics = metrics | {"startup_s": time.time() - loop_config["launched"] - spent}
            if rank == 0:
                metrics = metrics | system_metrics(device)
            if rank != 0 or checkpoint_path is None:  # an epoch between checkpoints: metrics only
                ray.train.report(metrics)
            else:
                with tempfile.TemporaryDirectory() as staging:
                    faults.disk_full(metrics["epoch"])
                    shutil.copy(checkpoint_path, Path(staging) / "last.pt")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))
            faults.lose_worker(metrics["epoch"])

        try:
            fit(
                config,
                train,
                val,
                data["classes"],
                scratch,
                report=report,
                device=device,
                weights=data["weights"].get(config.model.pretrained),
                validate_at=loop_config["validate_at"],
            )
        except DivergedError as err:
            ray.train.report(
                {
                    "epoch": err.epoch,
                    **{f"val_{metric}": math.nan for metric in METRIC_NAMES},
                    "val_loss": math.nan,
                    "diverged": 1.0,
                    "error": str(err),
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def system_metrics(device: torch.device) -> dict[str, float]:
    """This worker's machine over the last epoch, under MLflow's system-metric names (its UI shows them in
    the run's System metrics tab): CPU and memory, and on a GPU its peak allocated memory and utilisation.
    They travel with the epoch's result, so the driver stays the only MLflow writer wherever workers run."""
    memory = psutil.virtual_memory()
    out = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(),
        "system/system_memory_usage_megabytes": memory.used / 1e6,
        "system/system_memory_usage_percentage": memory.percent,
        "system/worker_memory_rss_megabytes": psutil.Process().memory_info().rss / 1e6,
    }
    if device.type == "cuda":
        i = device.index or 0
        out[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.max_memory_allocated(device) / 1e6
        torch.cuda.reset_peak_memory_stats(device)
        try:
            out[f"system/gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(device))
        except (ModuleNotFoundError, RuntimeError):  # needs pynvml / NVML
            pass
    return out


class ReportToTune(TuneReportCallback):
    """Ray Train → Tune: rank 0's metrics and the checkpoint's path, as Ray's own callback forwards them.

    Its one addition is the ``hold_final_report`` fault point (:mod:`pipeline.faults`): the gap
    between a run's stored final checkpoint and Tune's record of it, where an interrupted search
    once lost finished trials.
    """

    def __init__(self, max_epochs: int) -> None:
        super().__init__()
        self.max_epochs = max_epochs

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        faults.hold_final_report(int(metrics[0].get("epoch", 0)), self.max_epochs)
        super().after_report(run_context, metrics, checkpoint)


def run_training(
    config: Config, pipeline: PipelineConfig, data: SharedData, storage: str, name: str, callbacks: list, fold: int = 0
) -> ray.train.Result:
    """One Ray Train run of ``config`` with the workers ``pipeline.ray`` asks for; resumes ``storage/name`` if present.
    ``fold`` ≥ 1 trains and validates on that extra fold of the labelled images (:mod:`drtune.folds`)."""
    loop_config = {
        "config": config,
        "data": data,
        "threads": pipeline.ray.cpus_per_worker,
        "fold": fold,
        "specs": [methods.get(config.train.method)],
        "launched": time.time(),  # wall clock: the workers' start-up is timed against it (one machine, or NTP)
        "validate_at": rung_epochs(pipeline),  # validated whatever train.validate_every says: ASHA judges there
    }
    return run_workers(train_loop_per_worker, loop_config, pipeline, storage, name, callbacks)


def worker_resources(pipeline: PipelineConfig) -> dict[str, float]:
    """What one Train worker reserves: ``ray.cpus_per_worker`` CPUs and ``ray.gpus_per_worker`` GPUs. A share of a
    GPU (0.25) lets that many trials' workers run on one GPU at once; Ray sets each worker's
    ``CUDA_VISIBLE_DEVICES`` to the GPU it was given, which ``ray.train.torch.get_device`` then returns."""
    r = pipeline.ray
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}


def run_workers(
    loop, loop_config: dict, pipeline: PipelineConfig, storage: str, name: str, callbacks: list = ()
) -> ray.train.Result:
    """``loop(loop_config)`` on ``ray.workers_per_trial`` Ray Train workers (gloo, or nccl on GPUs), one
    checkpoint kept under ``storage/name`` (a run of the same name resumes from it), restarted from it up to
    ``ray.max_failures`` times."""
    r = pipeline.ray
    use_gpu = r.gpus_per_worker > 0
    resources = worker_resources(pipeline)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers_per_trial, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(
                max_failures=r.max_failures, controller_failure_limit=r.max_failures
            ),
        ),
    )
    return trainer.fit()


def read_checkpoint(checkpoint: ray.train.Checkpoint, target: Path) -> Path:
    """Copy a run's ``last.pt`` out of its checkpoint (local or remote storage) to ``target``."""
    with checkpoint.as_directory() as folder:
        shutil.copy(Path(folder) / "last.pt", target)
    return target


def run_name(kind: str, config: PipelineConfig, data_sha: str) -> str:
    """``<kind>-<dataset>-<digest>``: the digest changes with anything the run depends on.

    Settings (not the tracking ones, nor the progress bars), data and the code that trains all
    enter the digest, so a resume never mixes two runs, and a code change that makes DVC rerun a
    stage starts a new run instead of restoring the old one's finished results. Both the search
    and the CE baseline are named here.
    """
    keyed = config.model_dump(mode="json", exclude={"mlflow": True, "train": {"progress"}})
    digest = hashlib.sha256(json.dumps([keyed, data_sha, code_digest()], sort_keys=True).encode()).hexdigest()[:10]
    return f"{kind}-{config.data.dataset.split(':')[0]}-{digest}"


def code_digest() -> str:
    """SHA-256 of the Python sources a trial runs: the ``drtune`` library and this ``pipeline`` package."""
    h = hashlib.sha256()
    for package in (Path(drtune.__file__).parent, Path(__file__).parent):
        for source in sorted(package.glob("*.py")):
            h.update(source.name.encode())
            h.update(source.read_bytes())
    return h.hexdigest()
