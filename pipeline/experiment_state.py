"""A search as stored under ``ray.storage_path``: checked whole before it is restored, restored, or discarded.

A disk that fills while Tune saves its state leaves a file empty or cut, and Ray then fails later with
a message about search spaces; :func:`check_experiment_state` names the file instead, and every error
here says how to start afresh (:data:`FRESH_HINT`). Which files Tune stores is :mod:`pipeline.compat`'s.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs
from ray import tune

from drtune.config import ConfigError
from pipeline.cluster import filesystem_and_path
from pipeline.compat import tune_state_files
from pipeline.config import redact

FRESH_HINT = "start it afresh with `python -m pipeline.tune --fresh` (or `DRTUNE_FRESH=1 dvc repro`)"


class ExperimentStateError(RuntimeError):
    """The stored search cannot be restored (a half-written state); the message says how to start afresh."""


def check_experiment_state(path: str) -> None:
    """Raise :class:`ExperimentStateError` naming the file when the search stored at ``path`` is
    half-written: every file :func:`~pipeline.compat.tune_state_files` lists must be present and readable."""
    fs, base = filesystem_and_path(path)
    names = {info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(base)) if info.is_file}
    for name, parse in tune_state_files(names):
        try:
            with fs.open_input_stream(f"{base}/{name}") as f:
                parse(f.read())
        except Exception as err:  # noqa: BLE001 - any way a file fails to read means the state is unusable
            raise ExperimentStateError(
                f"the stored search at {redact(path)} is damaged: {name} cannot be read ({type(err).__name__}); {FRESH_HINT}"
            ) from None


def restore_tuner(path: str, trainable) -> tune.Tuner | None:
    """The Tuner stored at ``path`` (finished trials kept, unfinished resumed, errored retried), or None."""
    if not tune.Tuner.can_restore(path):
        return None
    check_experiment_state(path)
    try:
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
    except Exception as err:  # noqa: BLE001 - Ray raises many types for a state it cannot read
        raise ExperimentStateError(
            f"the stored search at {redact(path)} cannot be restored ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {FRESH_HINT}"
        ) from None


def discard_experiment(path: str) -> bool:
    """Delete the search stored at ``path`` (``--fresh``); True when there was one."""
    fs, base = filesystem_and_path(path)
    if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
        return False
    fs.delete_dir(base)
    return True


@contextmanager
def search_lock(storage: str, name: str) -> Iterator[None]:
    """Hold the search stored at ``storage/name`` for this run: a second run of the same search (a second
    ``dvc repro`` in the same project, a second machine on the same shared folder) is refused at once
    instead of resuming, or deleting with ``--fresh``, what the first is writing. An OS lock on a file
    beside the search, released however this process ends. Object storage (``s3://``) has no such lock:
    there, one run per search is the operator's to keep."""
    if "://" in storage:
        yield
        return
    path = Path(storage) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another run is using the search stored at {Path(storage) / name} (it holds {path}): "
                "wait for it to end, or stop it, then run this again"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
