"""The ``baseline`` stage: plain CE-tuning with the default hyperparameters, on the same splits.

    python -m pipeline.baseline --params params.yaml

Runs ``train.*`` as written (``lr_backbone``, ``lr_head``, …) with ``train.method = ce`` through
the same Ray Train workers as a trial, evaluates the final model once on the test split, and
writes ``metrics/baseline.json``. Every registered DR-Tune model carries its lift over this number.
It reads no ``tune.*`` or ``drtune.*`` key, so changing the search never re-runs it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from drtune.inference import load_predictor
from pipeline.evaluation import score
from pipeline.prepare import data_checksum, load_prepared
from pipeline.search import run_training, start_ray, trial_params
from pipeline.settings import PipelineParams, load
from pipeline.stage import flat, stage_main
from pipeline.tracking import connect, experiment_id, git_commit, log_params


def baseline_params(p: PipelineParams) -> PipelineParams:
    """``p`` as plain CE-tuning with its own learning rates (no search, no regulariser)."""
    ce = trial_params(p, {})
    ce.train.method = "ce"
    return ce


def run(p: PipelineParams, root: Path = Path(".")) -> dict:
    prepared = (root / p.data.prepared_dir).resolve()
    _, _, test, classes, stats = load_prepared(prepared)
    data_sha = data_checksum(stats)
    client = connect(p.tracking_uri(), p.mlflow.timeout_s)
    start_ray(p)
    ce = baseline_params(p)
    keyed = ce.model_dump(mode="json", include={"data", "model", "train", "ray"})
    name = "baseline-ce-" + hashlib.sha256(json.dumps([keyed, data_sha], sort_keys=True).encode()).hexdigest()[:10]
    start = time.time()
    result = run_training(ce, prepared, (root / p.ray.storage_path).resolve() / "baseline", name, [])
    checkpoint = Path(result.checkpoint.path) / "last.pt"
    history = torch.load(checkpoint, map_location="cpu", weights_only=False)["history"]
    scores = score(load_predictor(checkpoint).predict_proba(test.images), test)
    summary = {"method": "ce", "lr_backbone": ce.train.lr_backbone, "lr_head": ce.train.lr_head,
               "epochs": ce.train.epochs, "val_top1": history[-1]["val_top1"], "test_top1": scores["top1"],
               "test_top5": scores["top5"], "n_test": scores["n"], "wall_s": round(time.time() - start, 1),
               "data_sha256": data_sha}
    out = root / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(json.dumps(summary, indent=2))

    exp = experiment_id(client, p.experiment_name())
    run_id = client.create_run(exp, run_name=name, tags={"role": "ce-baseline", "git_commit": git_commit(root),
                                                          "data_sha256": data_sha, "dataset": p.data.dataset}).info.run_id
    log_params(client, run_id, flat(ce.model_dump(mode="json", include={"data", "model", "train"})))
    for h in history:
        for key in ("val_top1", "val_loss", "train_loss"):
            client.log_metric(run_id, key, h[key], step=h["epoch"])
    client.log_metric(run_id, "test_top1", scores["top1"])
    client.log_metric(run_id, "test_top5", scores["top5"])
    client.set_terminated(run_id, "FINISHED")
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("baseline", __doc__, argv, lambda path, sets: run(load(path, sets)),
                      lambda s: json.dumps({k: s[k] for k in ("val_top1", "test_top1", "wall_s")}))


if __name__ == "__main__":
    sys.exit(main())
