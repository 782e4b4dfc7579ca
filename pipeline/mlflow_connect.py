"""Connecting to MLflow, and what an error from it means.

* :func:`connect` points MLflow at ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` (default a
  SQLite file in the project), creates the database before any trial starts, and fails fast with
  a clear message when a tracking server does not answer.
* :func:`unreachable` tells "the tracking server did not answer" from "it refused the request", by
  exception type and HTTP status; :func:`tracking_errors` turns the first into one clear line.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from pipeline.config import redact

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
                f"MLflow tracking server {redact(uri)} is unreachable ({type(err).__name__}); start it, or unset "
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
            f"the MLflow tracking server {redact(mlflow.get_tracking_uri())} stopped answering{where}; "
            "what has run is stored (a search under ray.storage_path): run the stage again "
            "when it answers"
        ) from None
