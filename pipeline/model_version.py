"""A model version in the MLflow registry: the pyfunc (models-from-code), the model file, its ONNX export.

Registering is idempotent: a version carries the SHA-256 of the search's model file it was made from
(``checkpoint_sha256``; the registered file is that one with its calibration temperature) from its creation
on, so a rerun after an interruption finds that version (READY) and finishes it, instead of logging and
registering the same model twice; the ONNX export, checked against PyTorch, is made once.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from drtune import mlflow_model
from drtune.export import export_onnx
from drtune.inference import Predictor
from drtune.mlflow_model import SIGNATURE, model_metadata
from drtune.model_file import ModelFile
from pipeline.champion import CHECKSUM_TAG, registered_version

# Models-from-code: the pyfunc is this file, run by MLflow at load time, with drtune as its only code.
MODEL_CODE = mlflow_model.__file__
CODE_PATHS = [str(Path(mlflow_model.__file__).parent)]


def example_batch(split, n: int) -> np.ndarray:
    """The first ``n`` images of ``split`` as the model takes them: uint8 N × H × W × 3."""
    images = split.images[:n]
    return images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)


def model_version(
    client: MlflowClient, name: str, best: ModelFile, predictor: Predictor, test, folder: Path, checksum: str
):
    """(the version of ``name`` holding ``best``, registered now or before; the ONNX check when made now, else None).
    ``checksum`` identifies it: the SHA-256 of the search's model file it was made from (``best`` is that file
    calibrated, whose bytes hold a fitted temperature). Logged into the active MLflow run; ``folder`` is scratch
    space for the files it uploads."""
    weights = folder / "model.safetensors"
    weights.write_bytes(best.data)
    example = example_batch(test, 2)
    registered = registered_version(client, name, checksum)
    onnx_check = None  # a version registered before carries its checked export already
    if registered is None:
        onnx_check = export_onnx(predictor, folder / "model.onnx", example_batch(test, 16))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MODEL_CODE,
            artifacts={"checkpoint": str(weights), "onnx": str(folder / "model.onnx")},
            signature=SIGNATURE,
            input_example=example,
            code_paths=CODE_PATHS,
            pip_requirements=_requirements(),
            metadata=model_metadata(predictor.classes, predictor.image_size, predictor.data_cfg, predictor.temperature)
            | {"onnx_check": onnx_check},
        )
        # The checksum is a tag of the version from its creation on: an interrupted registration is
        # finished by the next run, not registered twice.
        registered = mlflow.register_model(info.model_uri, name, tags={CHECKSUM_TAG: checksum})
    return registered, onnx_check


# What the served model needs, pinned to the versions that registered it.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "mlflow",
    "pydantic",
    "pyyaml",
    "onnx",
    "onnxruntime",
)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in REQUIREMENTS]
