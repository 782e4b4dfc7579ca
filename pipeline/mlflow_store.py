"""The MLflow tracking store as the stages use it: connecting, experiments, runs, and what an error from it means.

* :func:`connect` points MLflow at ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` (default a
  SQLite file in the project), creates the database before any trial starts, and fails fast with
  a clear message when a tracking server does not answer.
* :func:`experiment_id` finds or creates the experiment, tagged as a model-training experiment so
  MLflow's UI opens it on its training runs rather than the GenAI overview.
* :func:`parent_run` finds or creates a search's parent run, keyed by the Ray experiment path, so a
  resumed search keeps writing to the same parent; :func:`discard_parent` detaches it (``--fresh``).
* :func:`run_outcome` ends a run with how its block ended; :func:`log_params` and :func:`log_history`
  write params once and per-epoch metrics.
* :func:`dataset_inputs` describes the prepared splits as MLflow datasets (name, our checksum as
  digest, source, shapes); every run that trains logs them, so the runs table's "Dataset" column
  names the data and a change of data is visible.
* :func:`unreachable` tells "the tracking server did not answer" from "it refused the request", by
  exception type and HTTP status; :func:`tracking_errors` turns the first into one clear line.
"""

from __future__ import annotations

import os
import subprocess
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from drtune.prepared import PreparedData
from pipeline import compat

TRIAL_TAG = "drtune.trial_id"
EXPERIMENT_TAG = "drtune.ray_experiment"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# What every training run logs per epoch (a trial's run and the CE baseline's alike).
METRIC_KEYS = (
    "val_top1",
    "val_top5",
    "val_loss",
    "train_loss",
    "train_ce",
    "train_reg",
    "lr",
    "lr_head",
    "epoch_s",
    "images_per_s",
)
# HTTP statuses that say the server (or the proxy in front of it) cannot answer now: bad gateway,
# unavailable, gateway timeout. Any other status is the server refusing the request.
UNAVAILABLE_STATUS = frozenset({502, 503, 504})


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached; nothing has started yet."""


def connect(uri: str, timeout_s: float = 10.0) -> MlflowClient:
    """Use ``uri`` for tracking and the registry; check it answers before any compute starts."""
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry a dead server for about 8 minutes per call (7 retries, backoff 2);
        # a search holds its records instead (TrialRuns), so each call gives up within seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as err:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it, or unset "
                "MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db"
            ) from None
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingUnavailableError(
            f"tracking URI {uri!r}: MLflow 3 needs a database (sqlite:///mlflow.db) or a server"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.search_experiments(max_results=1)  # creates and migrates a SQLite store now, not mid-search
    return client


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server did not answer (as opposed to refusing a request).

    MLflow's REST client (``mlflow.utils.rest_utils.http_request``) wraps whatever ``requests`` raised
    in a plain :class:`MlflowException` whose ``__cause__`` (a timeout) or ``__context__`` (anything
    else) is the original, so the chain is what tells: a ``requests`` ConnectionError (refused, reset,
    no route, or a read that timed out), a Timeout, or a RetryError (the server kept answering with a
    status MLflow retries, 408/429/5xx, until the retries ran out). A :class:`RestException` is the
    server's own JSON answer, transient only with an :data:`UNAVAILABLE_STATUS`. A local SQLite store's
    errors are never "unreachable" (MLflow labels some TEMPORARILY_UNAVAILABLE, but they carry no HTTP)."""
    if isinstance(err, RestException):
        return err.get_http_status_code() in UNAVAILABLE_STATUS
    if isinstance(err, MlflowException):
        inner = err.__cause__ or err.__context__
        return isinstance(inner, requests.RequestException) and unreachable(inner)
    if isinstance(err, requests.HTTPError):
        return err.response is not None and err.response.status_code in UNAVAILABLE_STATUS
    return isinstance(err, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError))


@contextmanager
def tracking_errors() -> Iterator[None]:
    """Turn "the tracking server stopped answering" into a one-line :class:`TrackingUnavailableError`
    (a stage's ``run`` is decorated with it: ``@tracking_errors()``)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, TrackingUnavailableError) or not unreachable(err):
            raise
        ours = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).parent == Path(__file__).parent]
        where = f" (in {Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
        raise TrackingUnavailableError(
            f"the MLflow tracking server {mlflow.get_tracking_uri()} stopped answering{where}; "
            "what has run is stored (a search under ray.storage_path): run the stage again "
            "when it answers"
        ) from None


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
    """Log a flat dict of params once (MLflow refuses to change a logged param)."""
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
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
