"""The cluster: start or join Ray, and the resources a trial asks of it.

``start_ray`` joins ``ray.address``, ``RAY_ADDRESS`` (set inside ``ray job submit``) or a running
local head, and otherwise starts a private local instance. ``trial_resources`` turns
``ray.workers_per_trial`` × ``ray.cpus_per_worker`` / ``ray.gpus_per_worker`` into the trial
driver's request and the number of trials that fit at once. ``storage_uri`` keeps a remote
``ray.storage_path`` (``s3://``, ``gs://``) as a URI and makes a local one absolute.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs
import ray

from drtune.config import ConfigError
from pipeline import compat
from pipeline.config import PipelineConfig

DRIVER_RESOURCE = "drtune_trial_driver"  # a local Ray gets plenty; trial drivers then need no CPU
DRIVER_CPUS_FALLBACK = 0.1  # on a cluster without that resource each driver holds this much CPU
_private = {"ray": False}  # whether start_ray started this process's Ray itself (a fixed-size, local instance)


def storage_uri(config: PipelineConfig, root: Path = Path(".")) -> str:
    """``ray.storage_path`` as Ray should see it: a URI unchanged, a local path made absolute under ``root``."""
    path = config.ray.storage_path
    return path if "://" in path else str((root / path).resolve())


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path, its query kept: pyarrow's own form of a custom S3 endpoint,
    ``s3://bucket/runs?endpoint_override=host:9000&scheme=http``, joined with ``baseline`` is
    ``s3://bucket/runs/baseline?endpoint_override=host:9000&scheme=http``."""
    if "://" not in uri:
        return "/".join([uri.rstrip("/"), *parts])
    split = urlsplit(uri)
    return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def filesystem_and_path(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A storage URI (or local path) as a pyarrow filesystem and the path within it."""
    return pyarrow.fs.FileSystem.from_uri(uri) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri)


def storage_filesystem(storage: str) -> pyarrow.fs.FileSystem | None:
    """The filesystem of a storage URI (``s3://`` honours ``AWS_ENDPOINT_URL``), None for a local path.

    Ray Tune reports a checkpoint as a path *within* its storage filesystem (``drtune/runs/…`` for
    ``s3://drtune/runs``); a :class:`ray.train.Checkpoint` built from it needs this filesystem.
    """
    return filesystem_and_path(storage)[0] if "://" in storage else None


def local_storage(config: PipelineConfig, root: Path = Path(".")) -> Path | None:
    """``ray.storage_path`` as a local folder, or None when it is remote storage (a URI)."""
    uri = storage_uri(config, root)
    return None if "://" in uri else Path(uri)


def _live_local_head() -> str | None:
    """The address of a running ``ray start`` head on this machine, forgetting one that is gone.

    ``ray start`` records its address in Ray's bootstrap file; a head killed without ``ray stop``
    leaves it behind. ``ray.init()`` would then try to join the dead head, and Ray Train's
    placement-group cleaner, which finds the cluster through that file, would never free the
    CPUs of trials stopped by ASHA: the search would wait forever. So a stale entry is removed.
    """
    address_file = compat.ray_address_file()
    recorded = address_file.read_text().strip() if address_file.is_file() else None
    if not recorded:
        return None
    if recorded in compat.live_gcs_addresses():
        return recorded
    address_file.unlink(missing_ok=True)
    return None


def ray_address(config: PipelineConfig) -> str | None:
    """The cluster to join: ``ray.address`` or RAY_ADDRESS (set inside ``ray job submit``); ``auto`` is the
    ``ray start`` head running on this machine. None: start a private Ray, even when a head runs here (a
    head nobody named is someone else's: sharing it, each search would size itself for the whole of it)."""
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address == "auto":
        address = _live_local_head()
        if address is None:
            raise ConfigError("ray.address = auto: no Ray head runs on this machine (start one with ray start --head)")
    return address


def private_cpus(config: PipelineConfig) -> int:
    """CPUs of a private Ray: ``ray.num_cpus``, else those this process may run on (its CPU affinity, which a
    container or ``taskset`` narrows), never every core of a machine shared with other runs."""
    return config.ray.num_cpus or len(os.sched_getaffinity(0))


# How often a Ray Train controller asks its workers whether they are done (Ray's default: 2 s). A run is seen
# to end only at a poll, and it polls at least once more after the one that saw it running: at 2 s every
# trial and re-validation ended ~4 s after its last epoch; at 0.25 s, under 1 s (bench/worker_startup.py).
TRAIN_POLL_S = 0.25


def worker_environment(config: PipelineConfig) -> dict[str, str]:
    """What every Ray worker of a stage needs in its environment: trials run in the project folder, not a
    per-trial one, a Train worker group that cannot start fails after ``ray.start_timeout_s``, and a Train run's
    controller polls its workers every :data:`TRAIN_POLL_S` (unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set)."""
    return {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(config.ray.start_timeout_s),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_S)),
    }


def start_ray(config: PipelineConfig) -> None:
    """Join the cluster :func:`ray_address` names; otherwise start a private local instance with
    :func:`private_cpus` and the trial-driver resource."""
    if ray.is_initialized():
        return
    env_vars = worker_environment(config)
    address = ray_address(config)
    if address:  # workers on other nodes get the variables through the job's runtime environment
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
    else:
        # A private Ray's processes inherit this one's environment. Setting the variables here, not in a
        # runtime_env, lets each new actor (a trial driver, a Train worker) start in one of the workers Ray
        # keeps pre-started, instead of a fresh process for the runtime_env (bench/worker_startup.py).
        os.environ.update(env_vars)
        ray.init(
            address="local",  # never an existing head (ray.init() alone would join the one `ray start` recorded)
            num_cpus=private_cpus(config),
            resources={DRIVER_RESOURCE: 10_000},
            log_to_driver=False,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )
    _private["ray"] = not address


def trial_resources(config: PipelineConfig) -> tuple[dict, int | None]:
    """(the trial driver's resource request, how many trials to run at once).

    When no trial fits the cluster as it is now: a private local Ray is fixed-size and can never
    fit one, so that is an error naming the fields; a cluster we joined may be autoscaling (GPU
    nodes appear when trials ask for them), so that is a warning, and the trials wait, pending,
    for the resources they asked for (None: Tune's own limit).
    """
    total = ray.cluster_resources()
    r = config.ray
    driver = {"CPU": 0, DRIVER_RESOURCE: 1} if total.get(DRIVER_RESOURCE, 0) >= 1 else {"CPU": DRIVER_CPUS_FALLBACK}
    need = {
        "CPU": r.workers_per_trial * r.cpus_per_worker + driver["CPU"],
        "GPU": r.workers_per_trial * r.gpus_per_worker,
    }
    fits = min(int(total.get(k, 0) // v) if v > 0 else 10**9 for k, v in need.items())
    if fits == 0 and not _private["ray"]:
        warnings.warn(
            f"the cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU now, less than one "
            f"trial's {need['CPU']:g} CPU and {need['GPU']:g} GPU: trials wait until nodes join "
            "(an autoscaling cluster adds them on demand)",
            stacklevel=2,
        )
        return driver, config.tune.max_concurrent_trials or None
    if fits == 0:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU (ray.workers_per_trial {r.workers_per_trial} × "
            f"ray.cpus_per_worker {r.cpus_per_worker:g} / ray.gpus_per_worker {r.gpus_per_worker:g}"
            f"{', + 0.1 CPU per trial driver' if driver['CPU'] else ''}) but the cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower ray.cpus_per_worker / ray.workers_per_trial"
            f" or start the nodes with --resources='{{\"{DRIVER_RESOURCE}\": 100}}'"
        )
    if config.tune.max_concurrent_trials:
        fits = min(fits, config.tune.max_concurrent_trials)
    return driver, fits
