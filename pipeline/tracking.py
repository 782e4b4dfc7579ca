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

import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
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
def tracking_errors() -> Iterator[None]:
    """Turn "the tracking server stopped answering" into a one-line :class:`TrackingUnavailableError`
    (a stage's ``run`` is decorated with it: ``@tracking_errors()``)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, TrackingUnavailableError) or not _unreachable(err):
            raise
        ours = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).parent == Path(__file__).parent]
        where = f" (in {Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
        raise TrackingUnavailableError(f"the MLflow tracking server {mlflow.get_tracking_uri()} stopped answering{where}; "
                                       "what has run is stored (a search under ray.storage_path): run the stage again "
                                       "when it answers") from None


def discard_parent(client: MlflowClient, experiment: str, ray_experiment: str) -> None:
    """Detach the parent run of a search that ``--fresh`` discards: it keeps its children and history but is
    no longer found for ``ray_experiment`` (its tag gains a "discarded" note), and nothing under it stays RUNNING."""
    for run in client.search_runs([experiment], filter_string=f"tags.`{EXPERIMENT_TAG}` = '{ray_experiment}'"):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        client.set_tag(run.info.run_id, EXPERIMENT_TAG, f"{ray_experiment} (discarded {stamp})")
        client.set_tag(run.info.run_id, "outcome", f"discarded by --fresh at {stamp}")
        stale = client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and "
                                                               "attributes.status = 'RUNNING'")
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
        if not _unreachable(err):
            raise


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log a flat dict of params once (MLflow refuses to change a logged param)."""
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i:i + 100])


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server did not answer (as opposed to refusing a request)."""
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish", "timed out", "503"))


_LIVE: TrialRuns | None = None  # the stage's TrialRuns; a restored Tuner's pickled copy resolves to it


def _live_trial_runs() -> TrialRuns:
    if _LIVE is None:
        raise RuntimeError("a search's TrialRuns callback was restored outside the tune stage")
    return _LIVE


class TrialRuns(Callback):
    """One MLflow child run per Tune trial, written from the driver.

    ``Tuner.restore`` brings back the callbacks pickled when the search first started; this one
    pickles as a reference to the stage's current instance (:meth:`__reduce__`), so a resumed
    search writes to today's tracking server and parent run, and the stage sees the writes Tune's
    calls held.

    A tracking server that goes away does not stop the search: the callback's MLflow writes are
    held, in order, and written when it answers again (one warning). :meth:`reconcile` then makes
    every trial's run agree with Tune's results, whatever was missed: epochs already logged are
    never logged twice, missing ones are added, and each run ends with its outcome.
    """

    def __init__(self, client: MlflowClient, experiment: str, parent_id: str, max_epochs: int,
                 inputs: list[DatasetInput] = ()) -> None:
        self.client, self.experiment, self.parent_id, self.max_epochs = client, experiment, parent_id, max_epochs
        self.inputs = list(inputs)
        self.runs: dict[str, str] = {}
        self.logged: dict[str, set[int]] = {}  # epochs each run already has (asked of the store once per run)
        self.held: list[Callable[[], None]] = []  # writes waiting for the tracking server
        self.warned = False
        global _LIVE
        _LIVE = self

    def __reduce__(self):
        return _live_trial_runs, ()

    def _write(self, action: Callable[[], None]) -> None:
        """Run ``action`` after every held write, or hold it while the tracking server does not answer."""
        self.held.append(action)
        self.flush()

    def flush(self) -> bool:
        """Write what was held; False when the tracking server still does not answer."""
        while self.held:
            try:
                self.held[0]()
            except Exception as err:  # noqa: BLE001 - only "unreachable" is held; anything else is raised
                if not _unreachable(err):
                    raise
                if not self.warned:
                    print(f"warning: the MLflow tracking server does not answer ({type(err).__name__}); the search goes "
                          "on and its records are written when it is back", file=sys.stderr, flush=True)
                    self.warned = True
                return False
            self.held.pop(0)
        if self.warned:
            print("the MLflow tracking server answers again; held records written", file=sys.stderr, flush=True)
            self.warned = False
        return True

    def _run(self, trial_id: str) -> str:
        """The trial's run: cached, else found in the store (a resumed search), else created."""
        run_id = self.runs.get(trial_id)
        if run_id is None:
            found = self.client.search_runs(
                [self.experiment], max_results=1,
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'")
            run_id = found[0].info.run_id if found else self.client.create_run(
                self.experiment, run_name=f"trial-{trial_id}",
                tags={PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id}).info.run_id
            self.runs[trial_id] = run_id
            self.logged[run_id] = {int(m.step) for m in self.client.get_metric_history(run_id, "val_top1")}
        return run_id

    def log_final(self, trial_id: str, metrics: dict[str, float]) -> None:
        """Numbers about a finished trial that come after it (its cross-validated score), on its run."""
        self._write(lambda: self.client.log_batch(self._run(trial_id), metrics=[
            Metric(k, float(v), int(time.time() * 1000), self.max_epochs) for k, v in metrics.items()]))

    def _start(self, trial_id: str, config: dict) -> str:
        run_id = self._run(trial_id)
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.client, run_id, config)
        if self.inputs and not self.client.get_run(run_id).inputs.dataset_inputs:
            self.client.log_inputs(run_id, datasets=self.inputs)
        return run_id

    def _log_epoch(self, trial_id: str, result: dict) -> None:
        """One epoch's metrics, unless the run has them already (a result Tune saw again after a resume)."""
        run_id, step = self._run(trial_id), int(result.get("epoch", 0))
        if step in self.logged[run_id] or result.get("diverged"):
            return
        now = int(time.time() * 1000)
        # resumed_from_epoch: only in the first result of a restarted attempt
        metrics = [Metric(k, float(result[k]), now, step) for k in result
                   if k in METRIC_KEYS or k.startswith("system/") or k == "resumed_from_epoch"]
        self.client.log_batch(run_id, metrics=metrics)
        self.logged[run_id].add(step)
        if "resumed_from_epoch" in result:
            restarts = len(self.client.get_metric_history(run_id, "resumed_from_epoch"))
            self.client.set_tag(run_id, "attempts", str(restarts + 1))

    def _finish(self, trial_id: str, last: dict, error: str | None) -> None:
        """Tag the run with its outcome and end it: FINISHED (completed or stopped early) or FAILED."""
        run_id = self._run(trial_id)
        epochs = int(last.get("epoch", 0))
        if error is None and last.get("diverged"):
            error = f"diverged, not retried: {last.get('error', 'non-finite loss')}"
        if error is not None:
            self.client.set_tag(run_id, "outcome", "failed")
            self.client.set_tag(run_id, "error", error[-4000:])
            self.client.set_terminated(run_id, "FAILED")
            return
        self.client.set_tag(run_id, "outcome", "completed" if epochs >= self.max_epochs
                            else f"stopped by ASHA after {epochs} epochs")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        self._write(lambda: self._start(trial_id, config))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        trial_id, result = trial.trial_id, dict(result)
        self._write(lambda: self._log_epoch(trial_id, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        trial_id, last = trial.trial_id, dict(trial.last_result or {})
        self._write(lambda: self._finish(trial_id, last, None))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        trial_id = trial.trial_id
        error_file = getattr(trial, "error_file", None)
        error = Path(error_file).read_text()[-4000:] if error_file and Path(error_file).is_file() else "unknown error"
        last = dict(trial.last_result or {})
        self._write(lambda: self._finish(trial_id, last, error))

    def reconcile(self, results, wait_s: float = 60.0) -> None:
        """Make every trial's run agree with Tune's ``results`` (a ``ResultGrid``): params, every reported
        epoch exactly once, outcome and status. Writes held during an outage come first; for them the
        tracking server is waited for up to ``wait_s`` seconds."""
        deadline = time.time() + wait_s
        self.held.append(lambda: self.client.search_experiments(max_results=1))  # the server answers
        while not self.flush() and time.time() < deadline:
            time.sleep(5)
        if self.held:
            raise TrackingUnavailableError("the MLflow tracking server went away during the search and has not come "
                                           "back; the search itself is stored: run the stage again when it answers")
        for r in results:
            metrics = r.metrics or {}
            trial_id = metrics.get("trial_id")
            if trial_id is None:  # failed before its first result: on_trial_error recorded it
                continue
            self._start(trial_id, dict(r.config))
            history = r.metrics_dataframe
            for row in ([] if history is None else history.to_dict("records")):
                self._log_epoch(trial_id, {k: v for k, v in row.items()
                                           if isinstance(v, (int, float)) and math.isfinite(v)})
            error = None if r.error is None else f"{type(r.error).__name__}: {r.error}"[-4000:]
            self._finish(trial_id, metrics, error)

    def close_open_runs(self) -> None:
        """Mark child runs still RUNNING (an interrupted search) KILLED; a resume reopens them. With the
        tracking server away nothing can be marked: the next run of the stage reconciles them."""
        try:
            if not self.flush():
                return
            running = self.client.search_runs(
                [self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and attributes.status = 'RUNNING'")
            for run in running:
                self.client.set_terminated(run.info.run_id, "KILLED")
        except Exception as err:  # noqa: BLE001
            if not _unreachable(err):
                raise
