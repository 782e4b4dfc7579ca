"""The champion: who holds the registered model's ``champion`` alias, and whether a challenger takes it.

:func:`champion_score` re-scores the current champion on *this* test split (a number from another
split is not comparable); :func:`decide` puts the gate against plain fine-tuning first and the
champion second, and says why in words; :func:`registered_version` finds a version by its model
file's SHA-256, which makes registering idempotent.
"""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.selection import PairedTest

CHECKSUM_TAG = "checkpoint_sha256"


def champion_score(client: MlflowClient, name: str, test, classes: list[str],
                   data_sha256: str) -> tuple[str | None, float | None, str, bool]:
    """(version, test top-1 on *this* test split, note, whether it loads) of the current champion, if comparable.

    The champion is re-scored here. One registered by an older release of this project may not load
    with today's code (its pickled model named modules that have moved); then its recorded test
    top-1 stands in when it was measured on this same prepared data, else it is not comparable.
    """
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None, "no champion yet", True
    try:
        predictor = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().predictor
    except Exception as err:  # noqa: BLE001 - whatever an old model's loading raises
        recorded = version.tags.get("test_top1")
        if recorded is not None and version.tags.get("data_sha256") == data_sha256:
            return (str(version.version), float(recorded), "champion's recorded test top-1 on this same data "
                    f"(it does not load with this code: {type(err).__name__})", False)
        return (str(version.version), None, f"champion does not load with this code ({type(err).__name__}); "
                "not comparable", False)
    if predictor.classes != classes:
        return str(version.version), None, "champion was trained on other classes; not comparable", True
    return str(version.version), predictor.score(test)["top1"], "re-scored on this test split", True


def registered_version(client: MlflowClient, name: str, checksum: str):
    """The version of ``name`` registered from the inference checkpoint with this SHA-256, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(CHECKSUM_TAG) == checksum), None)


def decide(new: float, current: float | None, note: str, champion_loads: bool = True,
           vs_baseline: PairedTest | None = None) -> tuple[bool, str]:
    """Whether the challenger becomes champion, and why, in words.

    First the gate against plain fine-tuning: a challenger that gets fewer test images right than the
    CE baseline's model (``vs_baseline``: challenger against baseline on the same images) is never
    promoted. Then the champion: promote when there is none or the new model is strictly better on the
    same split; a tie promotes too when the champion no longer loads (a model people can use beats an
    equal one they cannot)."""
    if vs_baseline is not None and vs_baseline.only_b > vs_baseline.only_a:
        t = vs_baseline
        noise = "beyond the noise" if t.p_value < 0.05 else "within the noise, but a gate takes no chances"
        return False, (f"not promoted: the search did not beat plain fine-tuning on this data: CE-tuning's model is "
                       f"better on test ({t.only_b - t.only_a} more of {t.n} images right, {t.difference:+.4f}; "
                       f"McNemar p = {t.p_value:.3g}, {noise})")
    if current is None:
        return note == "no champion yet", f"promoted: {note}" if note == "no champion yet" else f"kept champion: {note}"
    if new > current or (new == current and not champion_loads):
        relation = ">" if new > current else "= (the champion no longer loads)"
        return True, f"promoted: test top-1 {new:.4f} {relation} champion's {current:.4f}"
    return False, f"kept champion: test top-1 {new:.4f} ≤ champion's {current:.4f}"
