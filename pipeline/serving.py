"""The registered model: an MLflow pyfunc that takes raw images and returns labels and probabilities.

    model = mlflow.pyfunc.load_model("models:/drtune-fashion-mnist@champion")
    model.predict(images)   # DataFrame: label, class_index, probability, probabilities

Accepted ``images`` (see :mod:`drtune.inference`): uint8 H × W × C arrays of any size (a batch
N × H × W × C, or an object array / list of differently sized images; C = 1, 3 or 4) with values
0–255, or float32 N × C × H × W in [0, 1]. Over HTTP (``mlflow models serve``) send
``{"inputs": [[[[r, g, b], ...], ...]]}``: integer pixels are read as H × W × C, floats as C × H × W.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec


class DRTuneClassifier(PythonModel):
    """Loads ``inference.pt`` (encoder + head, classes, image size) and classifies raw images."""

    def load_context(self, context) -> None:
        from drtune.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        images = model_input
        if isinstance(images, np.ndarray) and images.dtype == object and images.ndim > 1:
            images = np.asarray(images.tolist())  # JSON input arrives as an object array
            images = images.astype(np.float32) if np.issubdtype(images.dtype, np.floating) else images
        proba = self.predictor.predict_proba(images)
        index = proba.argmax(1) if len(proba) else np.zeros(0, dtype=np.int64)
        return pd.DataFrame({
            "label": [self.predictor.classes[i] for i in index],
            "class_index": index.astype(np.int64),
            "probability": proba.max(1) if len(proba) else np.zeros(0),
            "probabilities": [row.astype(np.float64).tolist() for row in proba],
        })


# Inputs are declared as a free-form tensor: a uint8 spec would refuse float NCHW input and a float
# spec uint8 images (MLflow checks dtypes exactly); ``to_chw`` validates shapes and says what it expects.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("long", "class_index"), ColSpec("double", "probability"),
                    ColSpec(Array("double"), "probabilities")]),
)
