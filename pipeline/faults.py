"""Fault injection at named points of a search, for the fault-injection tests (``tests/test_faults.py``).

``DRTUNE_FAULT=<point>[@<epoch>],…`` and ``DRTUNE_FAULT_DIR=<folder>`` in the environment of the
process that starts Ray (workers inherit it) make the first process that reaches ``point`` (at
``epoch``, when given) fail there, once per fault folder: a marker file named for the point is
created atomically, so of several workers or attempts exactly one fails. Without ``DRTUNE_FAULT``
nothing here does anything. The points are the moments at which a real failure hurts most:

* ``hold_final_report``: the trial's Train run has stored its final checkpoint, and its result is
  on its way to Tune; the process stops forwarding it and waits (the test then interrupts the
  search), so Tune never records the trial's last epoch;
* ``lose_worker``: a Train worker dies (``SIGKILL``) right after reporting ``epoch``;
* ``interrupt_registration``: the register stage is interrupted (as by Ctrl-C) right after the new
  model version exists, before its aliases, tags and description;
* ``interrupt_before_alias``: the register stage is interrupted after the version's decision is
  recorded (tags, description), before ``@champion`` moves;
* ``disk_full``: writing the checkpoint of ``epoch`` fails with ``ENOSPC``. Unlike the others it
  fires every time while its marker folder holds no ``disk_freed`` file, as a full disk would.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path


def _armed(point: str, epoch: int) -> bool:
    """Whether ``point`` is set in ``DRTUNE_FAULT`` for ``epoch`` (any epoch when it names none)."""
    for item in filter(None, os.environ.get("DRTUNE_FAULT", "").split(",")):
        name, _, at = item.partition("@")
        if name == point and (not at or int(at) == epoch):
            return True
    return False


def _first(point: str) -> bool:
    """Claim ``point``'s marker in ``DRTUNE_FAULT_DIR``; True for exactly one caller."""
    try:
        fd = os.open(Path(os.environ["DRTUNE_FAULT_DIR"]) / point, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def hold_final_report(epoch: int, max_epochs: int) -> None:
    """Block forever before a trial's final result reaches Tune, once (see the module docstring)."""
    if epoch >= max_epochs and _armed("hold_final_report", epoch) and _first("hold_final_report"):
        while True:
            time.sleep(60)


def lose_worker(epoch: int) -> None:
    """Kill this worker process after it reported ``epoch``, once."""
    if _armed("lose_worker", epoch) and _first("lose_worker"):
        os.kill(os.getpid(), signal.SIGKILL)


def interrupt(point: str) -> None:
    """Raise :class:`KeyboardInterrupt` at ``point``, once."""
    if _armed(point, 0) and _first(point):
        raise KeyboardInterrupt(f"fault injected at {point}")


def disk_full(epoch: int) -> None:
    """Fail a checkpoint write with ENOSPC until the test frees the disk (writes ``disk_freed``)."""
    if _armed("disk_full", epoch) and not (Path(os.environ["DRTUNE_FAULT_DIR"]) / "disk_freed").exists():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoint")
