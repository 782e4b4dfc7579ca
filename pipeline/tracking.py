"""MLflow bookkeeping with one writer: the process that drives the search.

* :func:`connect` points MLflow at ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` (default a
  SQLite file in the project), creates the database before any trial starts, and fails fast with
  a clear message when a tracking server does not answer.
* :func:`experiment_id` finds or creates the experiment, tagged as a model-training experiment so
  MLflow's UI opens it on its training runs rather than the GenAI overview.
* :func:`dataset_inputs` describes the prepared splits as MLflow datasets (name, our checksum as
  digest, source, shapes); every run that trains logs them, so the runs table's "Dataset" column
  names the data and a change of data is visible.
* :func:`parent_run` finds or creates the search's parent run, keyed by the Ray experiment path,
  so a resumed search keeps writing to the same parent.
* :class:`TrialRuns` is a Ray Tune callback (it runs in the driver, never in workers) that keeps
  one child run per trial: hyperparameters, per-epoch metrics, and a final status. A restored
  trial gets its old run back (looked up by its trial tag), never a second one; :meth:`TrialRuns.close_open_runs` marks runs
  of an interrupted search KILLED so none is left RUNNING.
"""

from __future__ import annotations

import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from drtune.prepared import PreparedData

TRIAL_TAG = "drtune.trial_id"
EXPERIMENT_TAG = "drtune.ray_experiment"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# What every training run logs per epoch (a trial's run and the CE baseline's alike).
METRIC_KEYS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_ce", "train_reg", "lr", "lr_head", "epoch_s",
               "images_per_s")


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached; nothing has started yet."""


def connect(uri: str, timeout_s: float = 10.0) -> MlflowClient:
    """Use ``uri`` for tracking and the registry; check it answers before any compute starts."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as err:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it, or unset "
                "MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingUnavailableError(f"tracking URI {uri!r}: MLflow 3 needs a database (sqlite:///mlflow.db) or a server")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.search_experiments(max_results=1)  # creates and migrates a SQLite store now, not mid-search
    return client


def git_commit(folder: str | Path = ".") -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, check=True).stdout.strip()
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


def dataset_inputs(data: PreparedData, prepared_dir: str, splits: tuple[str, ...] = ("train", "val")) -> list[DatasetInput]:
    """The prepared ``splits`` as MLflow dataset inputs: named ``<dataset>-<split>``, our SHA-256 as digest,
    the split's file as source, and the split as context."""
    inputs = []
    slug = data.stats["dataset"].split(":", 1)[-1].rstrip("/").split("/")[-1]
    for split in splits:
        arrays = getattr(data, split)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways": a local file
            dataset = mlflow.data.from_numpy(arrays.images, targets=arrays.labels, name=f"{slug}-{split}",
                                             source=f"{prepared_dir}/{split}.npz", digest=data.stats["sha256"][split][:16])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
    return inputs


def log_history(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    """Per-epoch metrics of a finished run (the keys a trial's run gets as it goes), step = epoch."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in history for k in METRIC_KEYS if k in h]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])


def parent_run(client: MlflowClient, experiment: str, ray_experiment: str, tags: dict[str, str], run_name: str) -> str:
    """The parent run of the search stored at ``ray_experiment``: found again on resume, else created."""
    found = client.search_runs([experiment], filter_string=f"tags.`{EXPERIMENT_TAG}` = '{ray_experiment}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment, tags={EXPERIMENT_TAG: ray_experiment, **tags}, run_name=run_name)
    return run.info.run_id


@contextmanager
def run_outcome(client: MlflowClient, run_id: str) -> Iterator[str]:
    """End ``run_id`` with how the block ended: FINISHED, KILLED (an interrupt) or FAILED (anything else),
    so no run is left RUNNING whatever stops the stage."""
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log a flat dict of params once (MLflow refuses to change a logged param)."""
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i:i + 100])


class TrialRuns(Callback):
    """One MLflow child run per Tune trial, written from the driver."""

    def __init__(self, client: MlflowClient, experiment: str, parent_id: str, max_epochs: int,
                 inputs: list[DatasetInput] = ()) -> None:
        self.client, self.experiment, self.parent_id, self.max_epochs = client, experiment, parent_id, max_epochs
        self.inputs = list(inputs)
        self.runs: dict[str, str] = {}

    def _run(self, trial) -> str:
        """The trial's run: cached, else found in the store (a restored search), else created.

        The store is asked, not only the cache, because ``Tuner.restore`` brings back the callback
        pickled when the search first started, with whatever it knew then.
        """
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            found = self.client.search_runs(
                [self.experiment], max_results=1,
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TRIAL_TAG}` = '{trial.trial_id}'")
            run_id = found[0].info.run_id if found else self.client.create_run(
                self.experiment, run_name=f"trial-{trial.trial_id}",
                tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial.trial_id}).info.run_id
            self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.client, run_id, trial.config)
        if self.inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step, now = int(result.get("epoch", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in METRIC_KEYS if k in result]
        self.client.log_batch(self._run(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        epochs = int((trial.last_result or {}).get("epoch", 0))
        self.client.set_tag(run_id, "outcome", "completed" if epochs >= self.max_epochs else f"stopped by ASHA after {epochs} epochs")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        error = Path(trial.error_file).read_text()[-4000:] if getattr(trial, "error_file", None) and Path(trial.error_file).is_file() else "unknown error"
        self.client.set_tag(run_id, "outcome", "failed")
        self.client.set_tag(run_id, "error", error)
        self.client.set_terminated(run_id, "FAILED")

    def close_open_runs(self) -> None:
        """Mark child runs still RUNNING (an interrupted search) KILLED; a resume reopens them."""
        running = self.client.search_runs(
            [self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and attributes.status = 'RUNNING'")
        for run in running:
            self.client.set_terminated(run.info.run_id, "KILLED")
