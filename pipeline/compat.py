"""Every use of a Ray, Ray Tune or MLflow internal, in one place: what it is for and which public API is missing.

A Ray or MLflow upgrade that moves one of these breaks here, and only here. Ray is imported inside the
functions that need it, so importing this module (as :mod:`pipeline.mlflow_store` does) does not start
importing Ray.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

# --- Ray: the local head recorded by `ray start` --------------------------------------------------


def ray_address_file() -> Path:
    """The bootstrap file where ``ray start`` records the address of the head it started on this machine.

    Used to forget a head that was killed without ``ray stop`` (:func:`pipeline.cluster.start_ray`).
    Missing public API: Ray has no call for "the local head's address, if it is alive"; ``ray.init()``
    reads this file itself and joins whatever it names."""
    from ray._private import utils  # get_ray_address_file: the path, in Ray's default temp dir

    return Path(utils.get_ray_address_file(None))


def live_gcs_addresses() -> frozenset[str]:
    """Addresses of the Ray GCS servers running on this machine (found from the process list).

    Used with :func:`ray_address_file` to tell a live local head from a dead one. Missing public API:
    no public call lists local Ray clusters or checks that an address answers without joining it."""
    from ray._private import services  # find_gcs_addresses: greps ps for gcs_server

    return frozenset(services.find_gcs_addresses())


# --- Ray Tune: the files of a stored experiment ---------------------------------------------------

TUNER_FILE = "tuner.pkl"


def tune_state_files(names: Iterable[str]) -> list[tuple[str, Callable[[bytes], object]]]:
    """The files a stored Tune experiment must have, whole, for ``Tuner.restore`` to work, given the file
    names in its folder: ``tuner.pkl`` and the newest ``experiment_state-<time>.json`` with its
    ``search_gen_state-<time>.json`` and ``searcher-state-<time>.pkl``, each with a function that parses
    it (raising when it is cut or empty). Without an ``experiment_state`` file its placeholder name is
    listed, and it fails to open.

    Used by :func:`pipeline.experiment_state.check_experiment_state` to name a half-written file before
    Ray fails on it with an unrelated message. Missing public API: ``Tuner.can_restore`` only checks that
    ``tuner.pkl`` exists; these names and formats are Tune's internal storage layout (ray.tune.execution
    and ray.tune.search), not a documented format."""
    states = sorted(n for n in names if n.startswith("experiment_state-") and n.endswith(".json"))
    if not states:
        return [(TUNER_FILE, pickle.loads), ("experiment_state-<time>.json", json.loads)]
    stamp = states[-1][len("experiment_state-") : -len(".json")]
    # experiment_state is JSON; search_gen_state and basic-variant-state, despite their names, are pickles
    files = [(TUNER_FILE, pickle.loads), (f"experiment_state-{stamp}.json", json.loads)]
    if f"basic-variant-state-{stamp}.json" in names:  # a grid without a searcher (the re-validation)
        return [*files, (f"basic-variant-state-{stamp}.json", pickle.loads)]
    searcher = [f"search_gen_state-{stamp}.json", f"searcher-state-{stamp}.pkl"]
    if not any(n.startswith(("search_gen_state-", "searcher-state-")) for n in names):
        return files  # a grid that saves no state (lazily evaluated): nothing more to check
    # a searcher's search: the newest state's files must be there (a disk that filled after experiment_state
    # was written would otherwise let Tune restore an older searcher state without a word)
    return [*files, *((name, pickle.loads) for name in searcher)]


# --- MLflow: datasets logged through the client ---------------------------------------------------


def dataset_entity(dataset):
    """The :class:`mlflow.entities.Dataset` of an ``mlflow.data`` dataset (``mlflow.data.from_numpy``).

    Used to log datasets with ``MlflowClient.log_inputs``, which takes entities, on runs that the driver
    writes by id (:func:`pipeline.mlflow_store.dataset_inputs`). Missing public API: only the fluent
    ``mlflow.log_input`` converts a dataset, and it needs an active run in this process; the dataset's
    conversion, ``_to_mlflow_entity``, is private."""
    return dataset._to_mlflow_entity()


# --- Ray Tune: the scheduler a restored Tuner runs with --------------------------------------------


def tuner_scheduler(tuner):
    """The trial scheduler ``tuner`` will run with. ``Tuner.restore`` re-creates it from ``tuner.pkl`` as it
    was when the search was created (Tune never saves a scheduler's state), and ``Tuner`` has no public
    accessor; :func:`pipeline.early_stopping.replay_rungs` refills it."""
    return tuner._local_tuner._tune_config.scheduler


def trials_of(results) -> list[tuple[str, dict]]:
    """(trial id, sampled config) of every trial of a Tune ``ResultGrid``, in its order. ``Result.config`` and
    ``Result.metrics["trial_id"]`` come from a trial's last result, so a trial stopped before it reported once (the
    time budget ran out while it started) has neither; the Trial objects the grid was built from have both, and
    ``ResultGrid`` has no public accessor for them."""
    return [(trial.trial_id, dict(trial.config)) for trial in results._experiment_analysis.trials]


def set_tuner_stopper(tuner, stopper) -> None:
    """Give a restored ``tuner`` the stopper ``stopper``. ``Tuner.restore`` re-creates the RunConfig pickled when
    the search was created, whose stopper (:class:`pipeline.time_budget.TimeBudget`) counts from a clock reading
    of a process that has ended; Tune has no public way to replace it."""
    tuner._local_tuner._run_config.stop = stopper
