"""The ``tune`` stage's outputs: its files (models, metrics, plots) and the pick on the search's parent run.

The files are written into a scratch folder (:func:`staged`) and moved into place only once all of them
are written, ``models/best.json`` last: an interrupt or a full disk while writing never leaves a new model
beside an old description (run alone, the previous outputs stay; ``dvc repro`` removes a stage's outputs
before it runs, so there none are left, and DVC does not record the stage). :func:`write_outputs` writes
everything but ``models/best.json``, which the stage writes with the SHA-256 of the
``models/best.safetensors`` it describes (``register`` checks it); :func:`log_pick` records the winner,
the rule that chose it, the finalists and the leaderboard on the MLflow parent run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from operator import attrgetter
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from drtune.model_file import ModelFile, read_metadata
from pipeline import plots
from pipeline.choosing import write_models
from pipeline.config import PipelineConfig
from pipeline.leaderboard import leaderboard, validation_numbers
from pipeline.mlflow_store import log_params
from pipeline.selection import Candidate, Pick
from pipeline.space import searched_names, unprefixed
from pipeline.stage import write_csv

LAST = Path("models/best.json")  # what register reads first: moved in after everything it describes


@contextmanager
def staged(root: Path) -> Iterator[Path]:
    """A scratch folder (in ``root/models``, so moves stay on one filesystem) laid out like ``root``. When
    the block ends without an error, each of its files replaces the one at the same place under ``root``
    (a folder such as ``models/leaderboard`` is replaced whole, so a method no longer searched leaves no
    stale model), and :data:`LAST` goes last, after the old one was removed first. On an error nothing
    is moved. The scratch folder is removed either way."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tune-outputs-", dir=root / "models"))
    try:
        yield scratch
        (root / LAST).unlink(missing_ok=True)
        entries = [p.relative_to(scratch) for top in sorted(scratch.iterdir()) for p in sorted(top.iterdir())]
        for rel in sorted(entries, key=lambda rel: rel == LAST):
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(scratch / rel, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_outputs(
    p: PipelineConfig,
    root: Path,
    candidates: list[Candidate],
    trials: list[dict],
    chosen: Pick,
    scored: list[Candidate],
    wall_s: float,
    budget: dict | None = None,
    soup: tuple[ModelFile | None, dict | None] = (None, None),
) -> tuple[dict, dict]:
    """The stage's files (see the module docstring) but ``models/best.json``; returns (the numbers of
    ``metrics/tune.json``, what identifies the winner). ``trials`` holds each trial's status and epochs run,
    in ``candidates``' order (the baseline, last, is no trial); ``budget``, the time budget's record
    (:mod:`pipeline.time_budget`), goes to both, and so does ``soup``'s record (:mod:`pipeline.soups`); its
    model, when there is one, is ``models/best.safetensors``."""
    models, metrics_dir, plots_dir = root / "models", root / "metrics", root / "plots"
    for d in (models, metrics_dir, plots_dir):
        d.mkdir(parents=True, exist_ok=True)
    best = chosen.chosen
    m = best.metric  # tune.metric: the scores below are named by it (best_val_top1, best_val_macro_f1, …)
    shown = list(dict.fromkeys(p.search_methods() + [c.method for c in candidates if c.baseline]))
    keys = sorted({name for m in p.search_methods() for name in searched_names(p, m)})
    labels = [str(c.label) for c in p.tune.models or []]
    rows = [
        {
            "trial": c.id,
            **({"backbone": c.backbone} if labels else {}),
            "method": c.method,
            **{k: unprefixed(c.config).get(k) for k in keys},
            "val_score": c.val_score,  # tune.metric on validation: what the DVC plots draw
            **t,
        }
        for c, t in zip(candidates[: len(trials)], trials, strict=True)
    ]
    board = leaderboard(candidates, chosen, shown)
    backbones = leaderboard(candidates, chosen, labels, by=attrgetter("backbone")) if labels else {}
    write_models(board, candidates, models / "leaderboard")
    assert board[best.method]["best_trial"] == best.id, (board, best.id)  # the pick is its method's entry
    soup_model, soup_record = soup
    if soup_model is None:
        shutil.copy(models / "leaderboard" / f"{best.method}.safetensors", models / "best.safetensors")
    else:  # the pick averaged with other candidates: the released model (the leaderboard keeps the single ones)
        (models / "best.safetensors").write_bytes(soup_model.data)
    history = read_metadata(models / "best.safetensors")["history"]  # every epoch, resumes included
    curve = [
        {"epoch": h["epoch"], "val_score": h[f"val_{m}"], **{k: h[k] for k in ("val_top1", "val_loss", "train_loss")}}
        for h in history
    ]
    write_csv(metrics_dir / "tune_curve.csv", curve)
    write_csv(metrics_dir / "landscape.csv", rows)
    plots.learning_curves(curve, plots_dir / "learning_curve.png", f"best: {best.id}", m)
    plots.search_landscape(rows, keys, plots_dir / "landscape.png", m)
    record = chosen.record()
    gap = record["comparison"] or {}
    count = {status: sum(r["status"] == status for r in rows) for status in ("completed", "stopped", "cut", "failed")}
    # Numbers go to the DVC metrics file; what identifies the winner goes beside its model.
    metrics = {
        f"best_val_{m}": best.val_score,
        "best_val_loss": best.val_loss,
        "trials": len(rows),
        "completed": count["completed"],
        "stopped_early": count["stopped"],
        **({"cut_by_budget": count["cut"]} if budget else {}),
        "failed": count["failed"],
        "wall_s": round(wall_s, 1),
        "best_is_baseline": int(best.baseline),
        "revalidated": len(scored),
        **(
            {"gap_images": gap["gap_images"], "gap_low": gap["interval"][0], "gap_high": gap["interval"][1]}
            if gap
            else {}
        ),
        "best": unprefixed(best.config),
        **({f"best_cv_{m}": best.cv_score} if best.cv_score is not None else {}),
        **{k: int(v) if isinstance(v, bool) else v for k, v in (budget or {}).items()},
        **(
            {"soup_ingredients": len(soup_record["ingredients"]), f"soup_val_{m}": soup_record[f"val_{m}"]}
            if soup_record
            else {}
        ),
    }
    (metrics_dir / "tune.json").write_text(json.dumps(metrics, indent=2))
    (metrics_dir / "leaderboard.json").write_text(json.dumps(validation_numbers(board, m, backbones), indent=2))
    finalist_rows = [{"trial": c.id, f"val_{m}": c.val_score, f"cv_{m}": c.cv_score, "folds": c.folds} for c in scored]
    return metrics, {
        "best_sha256": hashlib.sha256((models / "best.safetensors").read_bytes()).hexdigest(),  # the file it describes
        "best_trial": best.id,
        "best_method": best.method,
        "best_backbone": best.backbone,
        "best_is_baseline": best.baseline,
        "best_config": best.config,
        "metric": m,
        "leaderboard": board,
        **({"backbones": backbones} if backbones else {}),
        "selection": record,
        "finalists": finalist_rows,
        **({"budget": budget} if budget else {}),
        **({"soup": soup_record} if soup_record else {}),
    }


def log_pick(client: MlflowClient, parent: str, chosen: Pick, record: dict) -> None:
    """The pick on the search's parent run: the winner, the rule and its reason, the finalists, the leaderboard."""
    best, selection, board = chosen.chosen, record["selection"], record["leaderboard"]
    client.log_metric(parent, f"best_val_{best.metric}", best.val_score)
    for tag, value in {
        "best_trial": best.id,
        "best_method": best.method,
        "best_backbone": best.backbone,
        "selection": chosen.rule,
        "selection_reason": chosen.reason,
    }.items():
        client.set_tag(parent, tag, value)
    if selection["comparison"]:
        client.log_metric(parent, "selection_gap_images", selection["comparison"]["gap_images"])
    if best.cv_score is not None:
        client.log_metric(parent, f"best_cv_{best.metric}", best.cv_score)
    if record["finalists"]:
        client.log_dict(parent, pd.DataFrame(record["finalists"]).to_dict(orient="split"), "finalists.json")
    for key, value in record.get("budget", {}).items():
        client.set_tag(parent, f"time_budget.{key}", str(value))
    client.log_dict(parent, selection, "selection.json")
    # the table format of MLflow's log_table, written whole (log_table appends on a rerun)
    client.log_dict(
        parent,
        pd.DataFrame([{"method": m, **e} for m, e in board.items()]).to_dict(orient="split"),
        "leaderboard_val.json",
    )
    backbones = record.get("backbones")
    if backbones:
        client.log_dict(
            parent,
            pd.DataFrame([{"backbone": b, **e} for b, e in backbones.items()]).to_dict(orient="split"),
            "backbones_val.json",
        )
    for key, value in validation_numbers(board, best.metric, backbones).items():
        client.log_metric(parent, f"leaderboard.{key}", value)
    # The parent's own params are the base params.yaml values; the winner's are logged beside them.
    log_params(client, parent, {f"best.{k}": v for k, v in best.config.items()})
