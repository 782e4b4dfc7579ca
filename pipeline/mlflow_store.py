"""The MLflow tracking store as the stages use it: experiments, parent runs, params, metrics, datasets.

Connecting, and telling an unreachable server from a refusal, is :mod:`pipeline.mlflow_connect`.

* :func:`experiment_id` finds or creates the experiment, tagged as a model-training experiment so
  MLflow's UI opens it on its training runs rather than the GenAI overview.
* :func:`parent_run` finds or creates a search's parent run, keyed by the Ray experiment path, so a
  resumed search keeps writing to the same parent; :func:`discard_parent` detaches it (``--fresh``).
* :func:`run_outcome` ends a run with how its block ended; :func:`log_params` and :func:`log_history`
  write params once and per-epoch metrics.
* :func:`dataset_inputs` describes the prepared splits as MLflow datasets (name, our checksum as
  digest, source, shapes); every run that trains logs them, so the runs table's "Dataset" column
  names the data and a change of data is visible.
"""

from __future__ import annotations

import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from drtune.prepared import PreparedData
from pipeline import compat
from pipeline.config import redact
from pipeline.mlflow_connect import unreachable

TRIAL_TAG = "drtune.trial_id"
EXPERIMENT_TAG = "drtune.ray_experiment"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# What every training run logs per epoch (a trial's run and the CE baseline's alike).
METRIC_KEYS = (
    "val_top1",
    "val_balanced_accuracy",  # tune.metric may choose by either of these two
    "val_macro_f1",
    "val_top5",
    "val_loss",
    "train_loss",
    "train_ce",
    "train_reg",
    "lr_backbone",  # absent for a method that does not train the backbone (the linear probe)
    "lr_head",
    "epoch_s",
    "val_s",
    "checkpoint_s",
    "startup_s",  # epoch 1 only (when reported): from the Train run's start to its first training step
    "images_per_s",
)


def git_commit(folder: str | Path = ".") -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if missing, and tagged as model training (see the module docstring)."""
    key, kind = EXPERIMENT_KIND
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={key: kind})
    if found.tags.get(key) != kind:
        client.set_experiment_tag(found.experiment_id, key, kind)
    return found.experiment_id


def dataset_inputs(
    data: PreparedData, prepared_dir: str, splits: tuple[str, ...] = ("train", "val")
) -> list[DatasetInput]:
    """The prepared ``splits`` as MLflow dataset inputs: named ``<dataset>-<split>``, our SHA-256 as digest,
    the split's file as source, and the split as context."""
    inputs = []
    slug = data.stats["dataset"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    for split in splits:
        arrays = getattr(data, split)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways": a local file
            dataset = mlflow.data.from_numpy(
                arrays.images,
                targets=arrays.labels,
                name=f"{slug}-{split}",
                source=f"{prepared_dir}/{split}.npz",
                digest=data.stats["sha256"][split][:16],
            )
        inputs.append(DatasetInput(compat.dataset_entity(dataset), tags=[InputTag("mlflow.data.context", split)]))
    return inputs


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log a flat dict of params once (MLflow refuses to change a logged param), credentials in URIs redacted."""
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i : i + 100])


def log_history(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    """Per-epoch metrics of a finished run (the keys a trial's run gets as it goes), step = epoch."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in history for k in METRIC_KEYS if k in h]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])


def run_exists(client: MlflowClient, run_id: str) -> bool:
    """Whether this store holds run ``run_id`` (a store that cannot be asked raises, as everywhere)."""
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def literal(value: str) -> str:
    """``value`` as a string literal of an MLflow filter. MLflow's filters have no escape: a value is quoted
    with whichever of ' and " it does not contain (a path like /home/o'brien/runs needs the double quotes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters, which an MLflow filter cannot match; rename it")


def parent_run(client: MlflowClient, experiment: str, ray_experiment: str, tags: dict[str, str], run_name: str) -> str:
    """The parent run of the search stored at ``ray_experiment``: found again on resume, else created."""
    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`{EXPERIMENT_TAG}` = {literal(ray_experiment)}",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment, tags={EXPERIMENT_TAG: ray_experiment, **tags}, run_name=run_name)
    return run.info.run_id


def discard_parent(client: MlflowClient, experiment: str, ray_experiment: str) -> None:
    """Detach the parent run of a search that ``--fresh`` discards: it keeps its children and history but is
    no longer found for ``ray_experiment`` (its tag gains a "discarded" note), and nothing under it stays RUNNING."""
    for run in client.search_runs([experiment], filter_string=f"tags.`{EXPERIMENT_TAG}` = {literal(ray_experiment)}"):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        client.set_tag(run.info.run_id, EXPERIMENT_TAG, f"{ray_experiment} (discarded {stamp})")
        client.set_tag(run.info.run_id, "outcome", f"discarded by --fresh at {stamp}")
        stale = client.search_runs(
            [experiment], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        )
        for child in [run, *stale]:
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")


@contextmanager
def run_outcome(client: MlflowClient, run_id: str) -> Iterator[str]:
    """End ``run_id`` with how the block ended: FINISHED, KILLED (an interrupt) or FAILED (anything else),
    so no run is left RUNNING whatever stops the stage."""
    try:
        yield run_id
    except KeyboardInterrupt:
        _end(client, run_id, "KILLED")
        raise
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run while another error is on its way out; a tracking server that is away cannot be told,
    and the original error is what the user must see (the next run of the stage ends the run)."""
    try:
        client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001
        if not unreachable(err):
            raise
