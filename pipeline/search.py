"""The hyperparameter search: Ray Tune with Optuna's TPE and ASHA, each trial a Ray Train run.

Shape of one search (the Train V2 pattern; ``Tuner(TorchTrainer(...))`` is gone in Ray 2.60):

    Tuner ── trial driver (a function trainable, holds almost nothing)
               └── TorchTrainer.fit() ── ``workers_per_trial`` workers, each running
                                         pipeline.worker.train_loop_per_worker (gloo or nccl)

Workers report validation metrics and a checkpoint every epoch; ``TuneReportCallback`` forwards
rank 0's report to Tune, where ASHA (time unit: epochs) may stop the trial and the Optuna searcher
records the value as an intermediate result.

How early stopping and the sampler fit together: Ray's OptunaSearch would tell Optuna that an
ASHA-stopped trial COMPLETED with its low, early-epoch score, as if that were its final result.
:class:`PruningOptunaSearch` tells such trials as PRUNED instead; TPE then ranks them by how far
they got and their last intermediate value, the way Optuna's own pruners work. Failed trials are
told as FAIL and are never sampled around. The final pick (:func:`select_best`) considers only
trials that ran every epoch and takes the highest final-epoch validation top-1 (ties: lower
validation loss): a stopped trial's score is from a shorter, un-annealed schedule and its
checkpoint is not a finished model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

import drtune
from drtune.config import ConfigError
from pipeline.settings import PipelineParams
from pipeline.worker import train_loop_per_worker

DRIVER_RESOURCE = "drtune_trial_driver"  # a local Ray gets plenty; trial drivers then need no CPU
DRIVER_CPUS_FALLBACK = 0.1  # on a cluster without that resource each driver holds this much CPU
METRIC = "val_top1"


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch that tells ASHA-stopped trials as PRUNED and errored trials as FAIL."""

    def __init__(self, *args, max_epochs: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or result is None or not math.isfinite(result.get(METRIC, float("nan"))):
            return super().on_trial_complete(trial_id, None, error=True)
        if result.get("epoch", 0) < self.max_epochs:
            return super().on_trial_complete(trial_id, None, error=False)  # no value, no error → PRUNED
        return super().on_trial_complete(trial_id, result, error=False)


def search_space(p: PipelineParams) -> dict:
    """Ray Tune distributions from ``tune.*`` for ``train.method``'s own hyperparameters.

    Learning rates are real step sizes, so λ never rescales the backbone's rate. A linear probe
    has no backbone rate; L2-SP adds α and β, BSS η, DR-Tune λ and K.
    """
    t, method = p.tune, p.train.method
    log = lambda r: tune.loguniform(r.low, r.high)
    if method == "drtune" and p.drtune.preset == "reference":
        # The authors' parametrisation: only their base rate r (train.lr_backbone) and K are free;
        # λ = K/B and the rates follow from them (drtune.config.resolve).
        space = {"lr_backbone": log(t.lr_backbone), "queue_size": tune.choice(t.queue_sizes)}
        _check_points(t, space)
        return space
    space = {"lr_head": log(t.lr_head)}
    if method != "linear_probe":
        space["lr_backbone"] = log(t.lr_backbone)
    if method == "drtune":
        space["lam"] = log(t.lam)
        space["queue_size"] = tune.choice(t.queue_sizes)
    if method == "l2sp":
        space["l2sp_alpha"], space["l2sp_beta"] = log(t.l2sp_alpha), log(t.l2sp_beta)
    if method == "bss":
        space["bss_eta"] = log(t.bss_eta)
    if t.weight_decay is not None:
        space["weight_decay"] = tune.loguniform(t.weight_decay.low, t.weight_decay.high)
    _check_points(t, space)
    return space


def _check_points(t, space: dict) -> None:
    for i, point in enumerate(t.points_to_evaluate):
        unknown = sorted(set(point) - set(space))
        missing = sorted(set(space) - set(point))
        if unknown or missing:
            raise ConfigError(f"tune.points_to_evaluate[{i}]: keys must be exactly {sorted(space)}"
                              f" (unknown {unknown}, missing {missing})")
        if "queue_size" in point and int(point["queue_size"]) not in t.queue_sizes:
            raise ConfigError(f"tune.points_to_evaluate[{i}].queue_size = {point['queue_size']} is not in tune.queue_sizes")


def trial_params(base: PipelineParams, config: dict) -> PipelineParams:
    """The full params of one trial: the base with the sampled values. The ``reference`` preset is
    kept only when λ is not searched (its search space); otherwise the sampled rates are real step sizes."""
    p = base.model_copy(deep=True)
    if "lam" in config or base.train.method != "drtune":
        p.drtune.preset = "custom"
    p.train.progress = False
    p.train.device = "cuda" if base.ray.gpus_per_worker > 0 else "cpu"
    for key, value in config.items():
        if key in ("lam", "queue_size"):
            setattr(p.drtune, key, int(value) if key == "queue_size" else float(value))
        elif key in ("l2sp_alpha", "l2sp_beta", "bss_eta"):
            setattr(p.baselines, key, float(value))
        else:
            setattr(p.train, key, float(value))
    return p


def run_training(p: PipelineParams, prepared: Path, storage: Path, name: str, callbacks: list) -> ray.train.Result:
    """One Ray Train run of ``fit`` with the configured workers; resumes from ``storage/name`` if present."""
    r = p.ray
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": p.model_dump(mode="json"), "prepared": str(prepared)},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures, controller_failure_limit=r.max_failures),
        ),
    )
    return trainer.fit()


def trial_driver(config: dict, *, base: dict, prepared: str, storage: str) -> None:
    """A Tune trial: build this trial's params and run its Ray Train job; metrics flow to Tune."""
    p = trial_params(PipelineParams.model_validate(base), config)
    run_training(p, Path(prepared), Path(storage), tune.get_context().get_trial_id(), [TuneReportCallback()])


def _live_local_head() -> str | None:
    """The address of a running ``ray start`` head on this machine, forgetting one that is gone.

    ``ray start`` records its address in Ray's bootstrap file; a head killed without ``ray stop``
    leaves it behind. ``ray.init()`` would then try to join the dead head, and Ray Train's
    placement-group cleaner, which finds the cluster through that file, would never free the
    CPUs of trials stopped by ASHA: the search would wait forever. So a stale entry is removed.
    """
    from ray._private import services, utils

    recorded = utils.read_ray_address()
    if not recorded:
        return None
    if recorded in services.find_gcs_addresses():
        return recorded
    Path(utils.get_ray_address_file(None)).unlink(missing_ok=True)
    return None


def start_ray(p: PipelineParams) -> None:
    """Join ``ray.address``, RAY_ADDRESS (set inside ``ray job submit``) or a running local head;
    otherwise start a private local instance with ``ray.num_cpus`` and the trial-driver resource."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(p.ray.start_timeout_s)}}
    address = p.ray.address or os.environ.get("RAY_ADDRESS") or _live_local_head()
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=p.ray.num_cpus, resources={DRIVER_RESOURCE: 10_000}, runtime_env=env, log_to_driver=False,
                 include_dashboard=True, dashboard_host="127.0.0.1")


def trial_resources(p: PipelineParams) -> tuple[dict, int]:
    """(the trial driver's resource request, how many trials fit at once); errors if none fits."""
    total = ray.cluster_resources()
    r = p.ray
    driver = {"CPU": 0, DRIVER_RESOURCE: 1} if total.get(DRIVER_RESOURCE, 0) >= 1 else {"CPU": DRIVER_CPUS_FALLBACK}
    need = {"CPU": r.workers_per_trial * r.cpus_per_worker + driver["CPU"], "GPU": r.workers_per_trial * r.gpus_per_worker}
    fits = min(int(total.get(k, 0) // v) if v > 0 else 10**9 for k, v in need.items())
    if fits == 0:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU (ray.workers_per_trial {r.workers_per_trial} × "
            f"ray.cpus_per_worker {r.cpus_per_worker:g} / ray.gpus_per_worker {r.gpus_per_worker:g}"
            f"{', + 0.1 CPU per trial driver' if driver['CPU'] else ''}) but the cluster has "
            f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU; lower ray.cpus_per_worker / ray.workers_per_trial"
            f" or start the nodes with --resources='{{\"{DRIVER_RESOURCE}\": 100}}'"
        )
    if p.tune.max_concurrent_trials:
        fits = min(fits, p.tune.max_concurrent_trials)
    return driver, fits


def experiment_name(p: PipelineParams, data_sha: str) -> str:
    """A name that changes with anything a trial depends on — settings, data and the code that
    trains — so a resume never mixes two searches, and a code change that makes DVC rerun the
    stage starts a new search instead of restoring the old one's results."""
    keyed = p.model_dump(mode="json", exclude={"mlflow": True, "train": {"progress"}})
    digest = hashlib.sha256(json.dumps([keyed, data_sha, code_digest()], sort_keys=True).encode()).hexdigest()[:10]
    return f"search-{p.data.dataset.split(':')[0]}-{digest}"


def code_digest() -> str:
    """SHA-256 of the Python sources a trial runs: the ``drtune`` library and this ``pipeline`` package."""
    h = hashlib.sha256()
    for package in (Path(drtune.__file__).parent, Path(__file__).parent):
        for source in sorted(package.glob("*.py")):
            h.update(source.name.encode())
            h.update(source.read_bytes())
    return h.hexdigest()


def build_tuner(p: PipelineParams, prepared: Path, storage: Path, name: str, callbacks: list) -> tune.Tuner:
    """A new Tuner, or the stored one restored (finished trials kept, unfinished ones resumed)."""
    driver, concurrency = trial_resources(p)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=p.model_dump(mode="json"), prepared=str(prepared),
                             storage=str(storage / "train")),
        driver,
    )
    path = storage / name
    run_config = tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=0))
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    t = p.tune
    sampler = optuna.samplers.TPESampler(seed=t.seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=t.startup_trials)
    searcher = PruningOptunaSearch(points_to_evaluate=[dict(x) for x in t.points_to_evaluate] or None, sampler=sampler,
                                   max_epochs=p.train.epochs)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=p.train.epochs, grace_period=t.grace_period,
                               reduction_factor=t.reduction_factor)
                 if t.early_stopping else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=search_space(p),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=concurrency),
        run_config=run_config,
    )


@dataclass
class Best:
    """The trial the search picked."""

    trial_id: str
    config: dict
    metrics: dict
    checkpoint: Path


def select_best(results: tune.ResultGrid, max_epochs: int) -> Best:
    """Highest final-epoch validation top-1 among trials that ran every epoch (ties: lower val loss)."""
    finished = [r for r in results if r.error is None and r.metrics and r.metrics.get("epoch", 0) >= max_epochs
                and math.isfinite(r.metrics.get(METRIC, float("nan")))]
    if not finished:
        raise RuntimeError(f"no trial completed all {max_epochs} epochs: {len(results)} trials, "
                           f"{sum(r.error is not None for r in results)} failed; see the Ray logs under the experiment path")
    best = max(finished, key=lambda r: (r.metrics[METRIC], -r.metrics.get("val_loss", 0.0)))
    return Best(trial_id=best.metrics["trial_id"], config=dict(best.config), metrics=dict(best.metrics),
                checkpoint=Path(best.metrics["checkpoint_path"]) / "last.pt")
