"""The ``baseline`` stage: plain CE-tuning with the default hyperparameters, on the same splits.

    python -m pipeline.baseline --params params.yaml

Runs ``train.*`` as written (``lr_backbone``, ``lr_head``, …) with ``train.method = ce`` through
the same Ray Train workers as a trial, evaluates the final model once on the test split, and
writes ``metrics/baseline.json`` (numbers) and ``models/baseline.safetensors`` + ``models/baseline.json``
(its inference model, validation score and data digest). The ``tune`` stage takes it as a candidate
(plain fine-tuning competes with the search), and ``register`` compares the challenger with it
image by image before promoting anything. It reads no ``tune.*`` or ``drtune.*`` key, so changing
the search never re-runs it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from drtune import methods
from drtune.config import Config
from drtune.evaluation import METRIC_NAMES
from drtune.inference import load_predictor, save_inference_checkpoint
from drtune.model_file import read_model
from drtune.preflight import preflight
from drtune.prepared import load_prepared
from pipeline.cluster import join_uri, local_storage, start_ray, storage_uri
from pipeline.config import PipelineConfig
from pipeline.mlflow_connect import connect, tracking_errors
from pipeline.mlflow_store import dataset_inputs, experiment_id, git_commit, log_history, log_params, run_outcome
from pipeline.pretrained import start_weights
from pipeline.stage import flat, stage_main
from pipeline.training import read_checkpoint, run_name, run_training, share_data


def baseline_config(p: PipelineConfig) -> Config:
    """``p``'s library sections as plain CE-tuning with its own learning rates (no search, no regulariser)."""
    ce = p.library()
    ce.train.method = methods.PLAIN
    ce.train.progress = False
    return ce


@tracking_errors()
def run(p: PipelineConfig, root: Path = Path(".")) -> dict:
    data = load_prepared(root / p.data.prepared_dir)
    p = p.with_steps_resolved(len(data.train))  # train.steps → train.epochs, now that the split's size is known
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    ce = baseline_config(p)
    backbone = start_weights(p, root)  # the pretrain stage's backbone, or None: model.pretrained as configured
    preflight(ce, local_storage(p, root), field="ray.storage_path")  # before Ray starts: one line, naming the field
    start_ray(p)
    named = p.model_copy(deep=True)
    named.train.method = methods.PLAIN
    name = run_name("baseline-ce", named, data.checksum + backbone.sha256)
    # The MLflow run is opened before training, so its duration is the training's.
    exp = experiment_id(client, p.mlflow_experiment())
    run_id = client.create_run(
        exp,
        run_name=name,
        tags={
            "role": "ce-baseline",
            "git_commit": git_commit(root),
            "data_sha256": data.checksum,
            "dataset": p.data.dataset,
        },
    ).info.run_id
    with run_outcome(client, run_id):
        log_params(client, run_id, flat(ce.model_dump(mode="json", include={"data", "model", "train"})))
        client.log_inputs(run_id, datasets=dataset_inputs(data, p.data.prepared_dir))
        start = time.time()
        result = run_training(
            ce, p, share_data(data, backbone.files()), join_uri(storage_uri(p, root), "baseline"), name, []
        )
        if result.metrics.get("diverged"):
            raise RuntimeError(
                f"the CE baseline diverged ({result.metrics['error']}): lower train.lr_backbone "
                f"({ce.train.lr_backbone}) or train.lr_head ({ce.train.lr_head})"
            )
        models = root / "models"
        models.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = read_checkpoint(result.checkpoint, Path(tmp) / "last.pt")
            model = read_model(save_inference_checkpoint(checkpoint, models / "baseline.safetensors"))
        history, scores = model.history, load_predictor(model).score(data.test)
        log_history(client, run_id, history)
        for metric in (*METRIC_NAMES, "top5"):
            client.log_metric(run_id, f"test_{metric}", scores[metric])
    summary = {
        "lr_backbone": ce.train.lr_backbone,
        "lr_head": ce.train.lr_head,
        "epochs": ce.train.epochs,
        "val_top1": history[-1]["val_top1"],
        **{f"test_{metric}": scores[metric] for metric in (*METRIC_NAMES, "top5")},
        "n_test": scores["n"],
        "wall_s": round(time.time() - start, 1),
    }
    out = root / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(json.dumps(summary, indent=2))
    # What the tune stage needs to make it a candidate; never its test score (the search must not see test).
    (models / "baseline.json").write_text(
        json.dumps(
            {
                **{f"val_{metric}": history[-1][f"val_{metric}"] for metric in METRIC_NAMES},  # any tune.metric
                "val_loss": history[-1]["val_loss"],
                "epochs": ce.train.epochs,
                "data_sha256": data.checksum,
                "backbone_sha256": backbone.sha256,
                "mlflow_run_id": run_id,
                "lr_backbone": ce.train.lr_backbone,
                "lr_head": ce.train.lr_head,
            },
            indent=2,
        )
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    def summary(s: dict) -> str:
        return json.dumps({k: s[k] for k in ("val_top1", "test_top1", "wall_s")})

    return stage_main("baseline", __doc__, argv, run, summary)


if __name__ == "__main__":
    sys.exit(main())
