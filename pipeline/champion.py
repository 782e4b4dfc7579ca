"""The champion: who holds the registered model's ``champion`` alias, and whether a challenger takes it.

:func:`champion_score` re-scores the current champion on *this* test split (a number from another
split is not comparable); :func:`decide` puts the gate against plain fine-tuning first and the
champion second, and says why in words; :func:`claim` moves the alias; :func:`registered_version`
finds a version by its model file's SHA-256, which makes registering idempotent.

Two registrations may run at once (two machines, one registry). MLflow's aliases have no
compare-and-set, so :func:`claim` reads the alias again just before moving it: when another version
took it meanwhile, the challenger is judged again against that one, and the alias is read back
after the move. What remains is the gap between that read and the move, one request long; a
registration that loses it sees so on the read-back and judges again against the winner, so the
better of two concurrent challengers ends as champion.
"""

from __future__ import annotations

from collections.abc import Callable

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from drtune.evaluation import METRIC_NAMES
from pipeline.mlflow_store import literal
from pipeline.significance import PairedTest

CHECKSUM_TAG = "checkpoint_sha256"


def champion_score(
    client: MlflowClient, name: str, test, classes: list[str], data_sha256: str, metric: str = "top1"
) -> tuple[str | None, float | None, str, bool]:
    """(version, test ``metric`` on *this* test split, note, whether it loads) of the current champion, if
    comparable.

    The champion is re-scored here. One registered by an older release of this project may not load
    with today's code (its pickled model named modules that have moved); then its recorded test
    score stands in when it was measured on this same prepared data, else it is not comparable.
    """
    version = _holder(client, name)
    if version is None:
        return None, None, "no champion yet", True
    try:
        predictor = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().predictor
    except Exception as err:  # noqa: BLE001 - whatever an old model's loading raises
        recorded = version.tags.get(f"test_{metric}")
        if recorded is not None and version.tags.get("data_sha256") == data_sha256:
            return (
                str(version.version),
                float(recorded),
                f"champion's recorded test {METRIC_NAMES[metric]} on this same data "
                f"(it does not load with this code: {type(err).__name__})",
                False,
            )
        return (
            str(version.version),
            None,
            f"champion does not load with this code ({type(err).__name__}); not comparable",
            False,
        )
    if predictor.classes != classes:
        return str(version.version), None, "champion was trained on other classes; not comparable", True
    return str(version.version), predictor.score(test)[metric], "re-scored on this test split", True


def registered_version(client: MlflowClient, name: str, checksum: str):
    """The READY version of ``name`` registered from the model file with this SHA-256, if any.

    A version whose registration failed or is still pending is not one (the caller registers the file
    again); a registry that cannot be asked is an error, never "not registered yet" (which would
    register the same model twice)."""
    versions = client.search_model_versions(f"name = {literal(name)}")
    return next((v for v in versions if v.tags.get(CHECKSUM_TAG) == checksum and v.status == "READY"), None)


def decide(
    new: float,
    current: float | None,
    note: str,
    champion_loads: bool = True,
    vs_baseline: PairedTest | None = None,
    metric: str = "top1",
) -> tuple[bool, str]:
    """Whether the challenger becomes champion, and why, in words; ``new`` and ``current`` are test ``metric``.

    First the gate against plain fine-tuning: a challenger that scores lower on test than the CE baseline's
    model (``vs_baseline``: challenger against baseline on the same images; for top-1, fewer images right)
    is never promoted. Then the champion: promote when there is none or the new model is strictly better on
    the same split; a tie promotes too when the champion no longer loads (a model people can use beats an
    equal one they cannot)."""
    name = METRIC_NAMES[metric]
    if vs_baseline is not None and vs_baseline.difference < 0:
        t = vs_baseline
        noise = "beyond the noise" if t.p_value < 0.05 else "within the noise, but a gate takes no chances"
        how = f"{t.only_b - t.only_a} more of {t.n} images right, " if metric == "top1" else ""
        return False, (
            f"not promoted: the search did not beat plain fine-tuning on this data: CE-tuning's model is "
            f"better on test ({how}{name} {t.difference:+.4f}; {t.test} p = {t.p_value:.3g}, {noise})"
        )
    if current is None:
        return note == "no champion yet", f"promoted: {note}" if note == "no champion yet" else f"kept champion: {note}"
    if new > current or (new == current and not champion_loads):
        relation = ">" if new > current else "= (the champion no longer loads)"
        return True, f"promoted: test {name} {new:.4f} {relation} champion's {current:.4f}"
    return False, f"kept champion: test {name} {new:.4f} ≤ champion's {current:.4f}"


def _holder(client: MlflowClient, name: str):
    """The model version that holds ``@champion`` now, or None."""
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def current(client: MlflowClient, name: str) -> str | None:
    """The version number that holds ``@champion`` now, or None."""
    holder = _holder(client, name)
    return None if holder is None else str(holder.version)


def claim(
    client: MlflowClient,
    name: str,
    version: str,
    seen: str | None,
    rescore: Callable[[], tuple],
    judge: Callable[[tuple], tuple[bool, str]],
    attempts: int = 5,
) -> tuple[bool, str | None]:
    """Move ``@champion`` to ``version``, judged against ``seen`` (the champion when ``register`` started).

    If another version holds the alias now, ``rescore()`` (:func:`champion_score`) scores it and
    ``judge`` decides again. Returns (whether ``version`` holds the alias at the end, the new decision
    when the champion changed meanwhile, else None)."""
    decision = None
    for _ in range(attempts):
        now = current(client, name)
        if now not in (seen, version):
            champion = rescore()
            promote, decision = judge(champion)
            seen = champion[0]
            if not promote:
                return False, decision
            continue  # judged against the newcomer; read again, it may have moved once more
        client.set_registered_model_alias(name, "champion", version)
        if current(client, name) == version:
            return True, decision
    return current(client, name) == version, decision
