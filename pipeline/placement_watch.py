"""Leaked placement groups: found during a search and removed, so the next trial's workers can start.

Each trial's Ray Train run reserves its workers' CPUs and GPUs in a placement group, created by the
trial's Train controller. A placement group lives as long as the *job* that created it, not as long
as its creator, so a controller that dies without shutting its worker group down (seen once here: a
trial stopped while a second Ray ran beside it) leaves the group reserved with no actor in it. The
next trial's worker group then waits for resources nobody uses, times out after
``ray.start_timeout_s`` and fails, and so does every later trial, with the CPUs idle.

:class:`PlacementGroupWatch` is a Tune callback that looks every ``every_s`` seconds at this job's
placement groups. One that reserves CPUs or GPUs, is created, and has had no live actor in it for
``idle_s`` seconds is leaked: a worker group fills its group within seconds of the reservation, and
a restarting one removes its group first. The watch removes it and says so in one line. Tune's own
groups for trial drivers hold their driver actor while the trial runs (and reserve no CPU or GPU where the
nodes offer ``pipeline.cluster.DRIVER_RESOURCE``), so they are never idle long enough to be touched.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group


class PlacementGroupWatch(tune.Callback):
    """Remove this job's placement groups that reserve CPUs or GPUs with no live actor for ``idle_s``."""

    def __init__(
        self, idle_s: float = 60.0, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.idle_s, self.every_s, self.clock = idle_s, every_s, clock
        self.idle_since: dict[str, float] = {}
        self.last = -float("inf")
        self.disabled = False
        self.failures = 0

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        now = self.clock()
        if self.disabled or now - self.last < self.every_s:
            return
        self.last = now
        try:
            self.sweep(now)
            self.failures = 0
        except Exception as err:  # noqa: BLE001 - no state API (no dashboard), or it timed out: three in a row, stop
            self.failures += 1
            if self.failures >= 3:
                self.disabled = True
                warnings.warn(
                    f"placement groups are not watched for leaks in this search ({type(err).__name__}: {err})",
                    stacklevel=2,
                )

    def sweep(self, now: float) -> list[str]:
        """One look (see the class docstring); returns the ids of the groups it removed."""
        from ray.util.state import list_actors

        job = ray.get_runtime_context().get_job_id()
        reserving = {
            pg_id
            for pg_id, pg in placement_group_table().items()
            if pg_id.endswith(job)  # a placement group's id ends with its job's
            and pg["state"] == "CREATED"
            and any(b.get("CPU", 0) > 0 or b.get("GPU", 0) > 0 for b in pg["bundles"].values())
        }
        limit = 10_000
        actors = list_actors(
            filters=[("state", "!=", "DEAD"), ("job_id", "=", job)],
            detail=True,
            limit=limit,
            timeout=5,  # it runs in Tune's event loop: never hold the search up for long
            address=ray.get_runtime_context().gcs_address,  # this Ray, whatever other Ray runs on the machine
            raise_on_missing_output=False,
        )
        if len(actors) >= limit:  # a truncated list could miss a group's worker: judge nothing this time
            return []
        used = {a.placement_group_id for a in actors if a.placement_group_id}
        self.idle_since = {pg_id: self.idle_since.get(pg_id, now) for pg_id in reserving - used}
        leaked = [pg_id for pg_id, since in self.idle_since.items() if now - since >= self.idle_s]
        for pg_id in leaked:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            del self.idle_since[pg_id]
            print(
                f"removed placement group {pg_id}: it reserved resources with no worker in it for "
                f"{self.idle_s:.0f} s (a trial's Train run ended without releasing it)",
                flush=True,
            )
        return leaked
