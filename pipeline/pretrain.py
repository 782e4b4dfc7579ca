"""The ``pretrain`` stage: self-supervised continued pretraining of the backbone on the unlabelled split.

    python -m pipeline.pretrain --params params.yaml

``pretrain.method: none`` (the default) passes the backbone through: ``models/pretrained/pretrain.json``
says so and ``baseline`` and ``tune`` start from ``model.pretrained`` as configured. With ``moco`` or
``simclr`` it runs :func:`drtune.pretrain.pretrain` on ``data/prepared/unlabelled.npz`` as one Ray
Train run (DDP over ``ray.workers_per_trial`` workers; CUDA and bf16 when ``ray.gpus_per_worker`` > 0)
and writes

    models/pretrained/backbone.safetensors   the backbone's own keys: every later training run loads it
                                             strictly, as the encoder's start and DR-Tune's frozen copy
    models/pretrained/pretrain.json          method, epochs, images, kNN top-1 (start → end), SHA-256, cost

Its MLflow run (role ``pretrain``) holds the settings, the per-epoch SSL loss and kNN top-1, and the
unlabelled split as an MLflow dataset. The run resumes from its last checkpoint like a trial: the
same settings and data give the same Ray run name, whose latest checkpoint Ray Train restores.
Bad settings are refused before Ray starts, in one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.entities import DatasetInput, InputTag, Metric

from drtune.config import ConfigError
from drtune.preflight import preflight
from drtune.prepared import load_prepared, load_unlabelled
from drtune.pretrain import backbone_state, pretrain, save_backbone
from drtune.train import load_checkpoint_state
from pipeline import compat
from pipeline.cluster import join_uri, local_storage, start_ray, storage_uri
from pipeline.config import PipelineConfig
from pipeline.mlflow_connect import connect, tracking_errors
from pipeline.mlflow_store import experiment_id, git_commit, log_params, run_outcome
from pipeline.pretrained import OUTPUT
from pipeline.stage import flat, stage_main
from pipeline.training import code_digest, run_workers

METRICS = ("ssl_loss", "knn_top1", "lr", "epoch_s", "images_per_s")


def check_settings(p: PipelineConfig, unlabelled: int) -> None:
    """Refuse what cannot work before Ray starts: a :class:`ConfigError` naming the field."""
    pre = p.pretrain
    if unlabelled == 0:
        raise ConfigError(
            f"pretrain.method = {pre.method}: the unlabelled split is empty (data.unlabelled = {p.data.unlabelled!r}); "
            "set data.unlabelled to rest or a folder and rerun prepare"
        )
    if pre.init == "weights" and p.model.pretrained == "none":
        raise ConfigError("pretrain.init = 'weights': model.pretrained is none; set weights or pretrain.init: scratch")
    per_worker = unlabelled // p.ray.workers_per_trial
    if pre.batch_size > per_worker:
        raise ConfigError(
            f"pretrain.batch_size = {pre.batch_size}: each of the {p.ray.workers_per_trial} worker(s) holds "
            f"{per_worker} unlabelled images; lower it (≥ 2, two views of each image)"
        )
    step_keys = 2 * pre.batch_size * p.ray.workers_per_trial  # both views' keys, all ranks
    if pre.method == "moco" and pre.queue_size < step_keys:
        raise ConfigError(
            f"pretrain.queue_size = {pre.queue_size} holds less than one step's {step_keys} keys (2 views × "
            f"pretrain.batch_size {pre.batch_size} × ray.workers_per_trial {p.ray.workers_per_trial}); raise it"
        )


def pretrain_run_name(p: PipelineConfig, data_sha: str, unlabelled_sha: str) -> str:
    """``pretrain-<dataset>-<digest>``: the digest covers what changes the backbone (its stage's DVC params,
    the data, the code), so an interrupted run resumes under the same name, and a change to the search's
    settings does not restart it."""
    keyed = {
        "model": p.model.model_dump(mode="json"),
        "pretrain": p.pretrain.model_dump(mode="json", exclude={"knn_k", "checkpoint_every"}),
        "train": {"image_size": p.train.image_size, "bf16": p.train.bf16},
        "ray": {"workers_per_trial": p.ray.workers_per_trial, "gpus_per_worker": p.ray.gpus_per_worker},
    }
    blob = json.dumps([keyed, data_sha, unlabelled_sha, code_digest()], sort_keys=True).encode()
    return f"pretrain-{p.dataset_slug()}-{hashlib.sha256(blob).hexdigest()[:10]}"


def _loop(loop_config: dict) -> None:
    """Ray Train entry point: {"config", "data" (a one-item list holding the object ref), "threads"}."""
    torch.set_num_threads(max(1, math.ceil(loop_config["threads"])))
    data = ray.get(loop_config["data"][0])
    scratch = Path(tempfile.mkdtemp(prefix="drtune-pretrain-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / "last.pt", scratch / "last.pt")
        rank = ray.train.get_context().get_world_rank()

        def report(metrics: dict, path: Path | None) -> None:
            if rank != 0 or path is None:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as staging:
                shutil.copy(path, Path(staging) / "last.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))

        config, device = loop_config["config"], ray.train.torch.get_device()
        try:
            pretrain(
                config,
                data["unlabelled"],
                data["train"],
                data["val"],
                len(data["classes"]),
                scratch,
                report=report,
                device=device,
                weights=data["weights"],
            )
        except FloatingPointError as err:  # a property of the settings: a restart would diverge again
            ray.train.report({"epoch": config.pretrain.epochs, "diverged": 1.0, "error": str(err)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path(".")) -> dict:
    out = root / OUTPUT
    if p.pretrain.method == "none":
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        record = {"method": "none", "backbone": f"{p.model.name} ({p.model.pretrained})"}
        (out / "pretrain.json").write_text(json.dumps(record, indent=2))
        return record
    data = load_prepared(root / p.data.prepared_dir)
    unlabelled = load_unlabelled(root / p.data.prepared_dir)
    check_settings(p, len(unlabelled))
    config = p.library(pretrained=False)
    config.train.progress = False
    checked = config.model_copy(deep=True)
    if p.pretrain.init == "scratch":  # the configured weights are not read
        checked.model.pretrained = "none"
    preflight(checked, local_storage(p, root), field="ray.storage_path")
    # A checkpoint file as the start: its bytes travel to the workers (another node does not have the file).
    from_file = p.pretrain.init == "weights" and p.model.pretrained not in ("bundled", "hub", "none")
    weights = (root / p.model.pretrained).read_bytes() if from_file else None
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    start_ray(p)
    unlabelled_sha = data.stats["unlabelled"]["sha256"]
    name = pretrain_run_name(p, data.checksum, unlabelled_sha)
    exp = experiment_id(client, p.mlflow_experiment())
    tags = {"role": "pretrain", "git_commit": git_commit(root), "dataset": p.data.dataset}
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    with run_outcome(client, run_id):
        log_params(client, run_id, flat(config.model_dump(mode="json", include={"model", "pretrain"})))
        log_params(client, run_id, {"train.image_size": config.train.image_size, "unlabelled_images": len(unlabelled)})
        client.log_inputs(run_id, datasets=[_unlabelled_input(unlabelled, p, unlabelled_sha)])
        start = time.time()
        arrays = {"unlabelled": unlabelled, "train": data.train, "val": data.val, "classes": data.classes}
        shared = ray.put(arrays | {"weights": weights})
        loop_config = {"config": config, "data": [shared], "threads": p.ray.cpus_per_worker}
        result = run_workers(_loop, loop_config, p, join_uri(storage_uri(p, root), "pretrain"), name)
        if result.metrics.get("diverged"):
            raise RuntimeError(f"the self-supervised run diverged ({result.metrics['error']})")
        with result.checkpoint.as_directory() as folder:
            state = load_checkpoint_state(Path(folder) / "last.pt")
        history = state["history"]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in history for k in METRICS if k in h]
        client.log_batch(run_id, metrics=metrics)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        info = {"method": p.pretrain.method, "epochs": p.pretrain.epochs, "images": len(unlabelled)}
        save_backbone(backbone_state(state["model"]), out / "backbone.safetensors", info)
        record = {
            "method": p.pretrain.method,
            "init": p.pretrain.init,
            "model": p.model.name,
            "start": p.model.pretrained if p.pretrain.init == "weights" else "random",
            "epochs": p.pretrain.epochs,
            "images": len(unlabelled),
            "knn_top1_start": history[0]["knn_top1"],
            "knn_top1": history[-1]["knn_top1"],
            "wall_s": round(time.time() - start, 1),
            "images_per_s": float(np.mean([h["images_per_s"] for h in history[1:]])),
            "sha256": hashlib.sha256((out / "backbone.safetensors").read_bytes()).hexdigest(),
            "unlabelled_sha256": unlabelled_sha,
            "mlflow_run_id": run_id,
            "settings": p.pretrain.model_dump(mode="json"),
        }
        client.log_metric(run_id, "wall_s", record["wall_s"])
        client.log_artifact(run_id, str(out / "backbone.safetensors"))
        (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    return record


def _unlabelled_input(images: np.ndarray, p: PipelineConfig, sha: str) -> DatasetInput:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways": a local file
        dataset = mlflow.data.from_numpy(
            images,
            name=f"{p.dataset_slug()}-unlabelled",
            source=f"{p.data.prepared_dir}/unlabelled.npz",
            digest=sha[:16],
        )
    return DatasetInput(compat.dataset_entity(dataset), tags=[InputTag("mlflow.data.context", "unlabelled")])


def main(argv: list[str] | None = None) -> int:
    def summary(record: dict) -> str:
        keys = ("method", "epochs", "images", "knn_top1_start", "knn_top1", "wall_s")
        return json.dumps({k: record[k] for k in keys if k in record})

    return stage_main("pretrain", __doc__, argv, run, summary)


if __name__ == "__main__":
    sys.exit(main())
