"""The model card: the Markdown a person reads on a registered version's page.

What the model is (backbone, weights, method and the hyperparameters that trained it, resolved),
what it was trained on, why it was chosen, how it scores on test against plain fine-tuning, and
how to load and serve it. :mod:`pipeline.register` writes it as the version's description.
"""

from __future__ import annotations

from drtune import methods
from drtune.evaluation import METRIC_NAMES
from pipeline.significance import PairedTest

# What every version states besides its method's knobs (resolved: the numbers that trained it).
COMMON = ("train.lr_head", "train.weight_decay", "train.epochs", "train.batch_size", "train.optimizer")


def hyperparameters(params: dict) -> dict[str, object]:
    """The trained model's method-specific and common hyperparameters, from its checkpoint's resolved params."""
    spec = methods.get(params["train"]["method"])
    keys = tuple(k.field for k in spec.knobs) + (("train.lr_backbone",) if spec.trains_backbone else ()) + COMMON
    return {key: params[key.split(".")[0]][key.split(".")[1]] for key in keys}


def pretrain_summary(record: dict) -> str:
    """One line on a self-supervised start (the pretrain stage's ``pretrain.json``)."""
    names = {"moco": "MoCo v2", "simclr": "SimCLR"}
    return (
        f"{names.get(record['method'], record['method'])}, {record['epochs']} epochs on {record['images']} unlabelled "
        f"images from {record['start']} weights (kNN top-1 on validation {record['knn_top1_start']:.4f} → "
        f"{record['knn_top1']:.4f})"
    )


def model_description(
    name: str,
    version: str,
    params: dict,
    classes: list[str],
    stats: dict,
    scores: dict,
    baseline_score: float,
    decision: str,
    experiment_id: str | None = None,
    selection: dict | None = None,
    vs_baseline: PairedTest | None = None,
    pretrained: dict | None = None,
    calibration: dict | None = None,
    metric: str = "top1",
    soup: dict | None = None,
) -> str:
    """The Markdown a person reads on the registry page: what the model is, how good, how to call it.
    ``baseline_score`` is the CE baseline's test ``metric`` (``tune.metric``), the score the search chose by."""
    method = methods.get(params["train"]["method"]).long_name
    rows = "\n".join(
        f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
        for k, v in hyperparameters(params).items()
    )
    counts = {split: sum(stats["counts"][split]) for split in ("train", "val", "test")}
    shown = ", ".join(classes[:12]) + (f", … ({len(classes)} in all)" if len(classes) > 12 else "")
    size = params["train"]["image_size"]
    lift = scores[metric] - baseline_score
    name_of = METRIC_NAMES[metric]
    # MLflow 3.17's UI picks the experiment view from its GenAI / Model training switch, not from the
    # experiment's kind tag; this link opens the training runs directly.
    paired = ""
    if vs_baseline is not None:
        low, high = vs_baseline.interval()
        paired = (
            f" (paired on the same images: {vs_baseline.only_a} right only by this model, {vs_baseline.only_b} only "
            f"by CE-tuning's; 95 % interval [{low:+.4f}, {high:+.4f}], {vs_baseline.test} p = {vs_baseline.p_value:.3g})"
        )
    runs = (
        f"\n\nThe search's trials and the CE baseline: [training runs](#/experiments/{experiment_id}/runs"
        "?workflowType=machine_learning)."
        if experiment_id
        else ""
    )
    others = ", ".join(
        f"{label} {scores[key]:.4f}"
        for key, label in (*((k, v) for k, v in METRIC_NAMES.items() if k != metric), ("top5", "top-5"))
    )
    souped = (
        f"\n\n**Model soup** ({soup['recipe']}, chosen on {soup['chosen_on']}): the weight average of "
        f"{len(soup['ingredients'])} fine-tuned models, {', '.join(soup['ingredients'])}; validation {name_of} "
        f"{soup[f'val_{metric}']:.4f} against {soup[f'pick_val_{metric}']:.4f} for the pick alone. The "
        "hyperparameters above are the first ingredient's."
        if soup
        else ""
    )
    start = f"\n\n**Self-supervised start**: {pretrain_summary(pretrained)}." if pretrained else ""
    calibrated = (
        f"\n\n**Calibrated probabilities**: temperature {calibration['temperature']:.3f}, fitted on the "
        f"{calibration['temperature_fit_images']} validation images; expected calibration error on test "
        f"{calibration['test_ece_before']:.4f} before, **{calibration['test_ece']:.4f}** after (15 bins). The ONNX "
        "export holds it as the scalar `temperature` and outputs `probabilities` beside `logits`."
        if calibration
        else ""
    )
    return f"""**{params["model"]["name"]}** (weights: `{params["model"]["pretrained"]}`) fine-tuned with **{method}**.{start}{souped}

| hyperparameter | value |
|---|---|
{rows}

**Data**: `{stats["dataset"]}`, {len(classes)} classes ({shown}); {counts["train"]} training,
{counts["val"]} validation and {counts["test"]} test images (data digest `{stats["sha256"]["train"][:16]}`).
**Input**: images of any size, resized and centre-cropped to {size} × {size} px (RGB; grey images are repeated).

**Why this model** ({selection["rule"] if selection else "validation"} pick): {selection["reason"] if selection else "best on validation"}.

**Test {name_of} {scores[metric]:.4f}** ({others}, {scores["n"]} images) against the CE-tuning
baseline's {baseline_score:.4f}: lift **{lift:+.4f}**{paired}. Champion decision for version {version}: {decision}.{calibrated}{runs}

```python
import mlflow
model = mlflow.pyfunc.load_model("models:/{name}@champion")
model.predict(images)  # uint8 N × H × W × C (0–255) → label, class_index, probability, probabilities
```

Serve it: `mlflow models serve -m "models:/{name}@champion" -p 5001 --env-manager local`
"""
