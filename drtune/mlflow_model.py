"""The registered model: an MLflow pyfunc that takes raw images and returns labels and probabilities.

Logged as *models-from-code*: MLflow stores this file and runs it when the model is loaded (no
cloudpickle of our objects), with the ``drtune`` package as its only code path, so loading the
model puts nothing but ``drtune`` on a user's import path. ``mlflow.models.set_model`` at the
bottom names the model object. The ``drtune`` library itself never imports this module.

    model = mlflow.pyfunc.load_model("models:/drtune-fashion-mnist@champion")
    model.predict(images)   # DataFrame: label, class_index, probability, probabilities

Input (the signature's schema, enforced by MLflow): uint8 images N × H × W × C, values 0–255, of
any size and C = 1, 3 or 4 (a list of same-sized images: ``np.stack(images)``; floats in [0, 1]:
``(x * 255).round().astype(np.uint8)``). Each is resized and centre-cropped as the validation
images were. Over HTTP (``mlflow models serve``) send ``{"inputs": [[[[r, g, b], ...], ...]]}``:
the server reads the integers as uint8 by that schema. The model's metadata (``model_metadata``)
names its classes, input size, mean/std and layout, and the model version carries an ONNX export
of the network (``artifacts/model.onnx``) for runtimes without Python.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec


class DRTuneClassifier(PythonModel):
    """Loads the model file (encoder + head, classes, image size; :mod:`drtune.model_file`) and classifies raw images."""

    def load_context(self, context) -> None:
        from drtune.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        try:
            proba = self.predictor.predict_proba(model_input)
        except ValueError as err:  # a served model answers 400 with this sentence, not a stack trace
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        index = proba.argmax(1) if len(proba) else np.zeros(0, dtype=np.int64)
        return pd.DataFrame(
            {
                "label": [self.predictor.classes[i] for i in index],
                "class_index": index.astype(np.int64),
                "probability": proba.max(1) if len(proba) else np.zeros(0),
                "probabilities": [row.astype(np.float64).tolist() for row in proba],
            }
        )


# Rank and dtype are fixed; height, width and channels are free (``to_chw`` checks C and says what it expects).
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
    outputs=Schema(
        [
            ColSpec("string", "label"),
            ColSpec("long", "class_index"),
            ColSpec("double", "probability"),
            ColSpec(Array("double"), "probabilities"),
        ]
    ),
)


def model_metadata(classes: list[str], image_size: int, data_cfg: dict, temperature: float = 1.0) -> dict:
    """What a user needs to feed the model (or its ONNX export) without our code: stored in the MLmodel file."""
    return {
        "classes": list(classes),
        "image_size": image_size,
        "temperature": temperature,
        "mean": list(data_cfg["mean"]),
        "std": list(data_cfg["std"]),
        "interpolation": data_cfg.get("interpolation", "bilinear"),
        "crop_pct": data_cfg.get("crop_pct", 0.875),
        "input": "uint8 images N × H × W × C (C = 1, 3 or 4), values 0–255, any size",
        "onnx_input": f"float32 N × 3 × {image_size} × {image_size}: resized to image_size / crop_pct, centre-"
        "cropped, scaled to [0, 1], normalised with mean and std",
        "output": "label, class_index, probability, probabilities (in the order of classes; softmax(logits / "
        "temperature), calibrated on validation); the ONNX export outputs logits and probabilities",
    }


set_model(DRTuneClassifier())
