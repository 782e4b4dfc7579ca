"""The driver's side of choosing: the candidates' models scored image by image, re-validation, the pick.

The ``tune`` stage hands its trials and the CE baseline here. :func:`baseline_candidate` makes the
baseline stage's model a candidate (refusing one trained on other data or epochs); :func:`near_the_top`
scores the candidates the unpaired interval cannot separate on the validation images, one by one, on
the driver; :func:`choose` asks :mod:`pipeline.selection` for the pick, re-validating tied finalists
first (:func:`revalidation`) when ``tune.revalidate`` says so; :func:`write_models` writes each
method's best model file for the leaderboard.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ray.train import Checkpoint

from drtune import methods
from drtune.config import ConfigError
from drtune.data import ArraySplit
from drtune.folds import extra_fold
from drtune.inference import load_predictor, save_inference_checkpoint
from drtune.prepared import PreparedData
from pipeline.cluster import join_uri, storage_filesystem
from pipeline.config import PRETRAINED_WEIGHTS, PipelineConfig, redact
from pipeline.search import build_finalist_tuner, cross_validated, require_finished
from pipeline.selection import BASELINE, Candidate, Outcomes, Pick, pick, rank, tied_with_best
from pipeline.selection import finalists as selection_finalists
from pipeline.time_budget import TimeBudget
from pipeline.training import SharedData, read_checkpoint


def baseline_candidate(
    root: Path, p: PipelineConfig, data_sha256: str, n_val: int, backbone_sha256: str = "", backbone: str = ""
) -> Candidate | None:
    """The CE baseline (the ``baseline`` stage's model) as a candidate, or None when that stage has not run here;
    ``backbone``: the label of what it fine-tuned (``model.*``'s, :meth:`PipelineConfig.default_backbone`).

    It must have trained on these splits for these epochs, from this backbone (``backbone_sha256``: the
    pretrain stage's weights, empty for ``model.pretrained`` as configured): a baseline of other data,
    another schedule or another start is an error, not a silently unfair comparison."""
    record, model = root / "models" / "baseline.json", root / "models" / "baseline.safetensors"
    if not (record.is_file() and model.is_file()):
        print(
            "no CE baseline here (models/baseline.json): it is not a candidate; run the baseline stage first "
            "to let plain fine-tuning compete",
            flush=True,
        )
        return None
    b = json.loads(record.read_text())
    if b["data_sha256"] != data_sha256 or b["epochs"] != p.train.epochs:
        raise ConfigError(
            f"models/baseline.json was trained on other data or for {b['epochs']} epochs (train.epochs "
            f"= {p.train.epochs}): run the baseline stage again (dvc repro does)"
        )
    if b.get("backbone_sha256", "") != backbone_sha256:
        raise ConfigError(
            "models/baseline.json was trained from another backbone than the pretrain stage's "
            f"{PRETRAINED_WEIGHTS if backbone_sha256 else 'model.pretrained'}: run the baseline stage again"
        )
    return Candidate(
        id=BASELINE,
        method=methods.PLAIN,
        val_score=b[f"val_{p.tune.metric}"],
        val_loss=b["val_loss"],
        n_val=n_val,
        metric=p.tune.metric,
        backbone=backbone,
        config={"method": methods.PLAIN, "lr_backbone": b["lr_backbone"], "lr_head": b["lr_head"]},
        baseline=True,
        ref=model,
    )


def predictions_on(model: Path | Checkpoint | None, split: ArraySplit, num_classes: int) -> Outcomes:
    """Per image of ``split``, a final model's prediction (scored here, on the driver, with the evaluation
    transform): a model file (the baseline's), or a trial's Ray checkpoint; None, a model that diverged,
    gets every image wrong."""
    labels = tuple(int(y) for y in split.labels)
    if model is None:
        return Outcomes(labels, tuple((y + 1) % num_classes for y in labels), num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        predicted = load_predictor(write_model_file(model, Path(tmp) / "m.safetensors")).score(split)["predicted"]
    return Outcomes(labels, tuple(int(x) for x in predicted), num_classes)


def write_model_file(ref: Path | Checkpoint, target: Path) -> Path:
    """A candidate's model as a model file at ``target``: the baseline's file copied, a trial's Ray checkpoint
    (local or remote storage) converted."""
    if isinstance(ref, Path):
        return Path(shutil.copy(ref, target))
    with tempfile.TemporaryDirectory() as tmp:
        return save_inference_checkpoint(read_checkpoint(ref, Path(tmp) / "last.pt"), target)


def scored_on(candidate: Candidate, split: ArraySplit, num_classes: int) -> Candidate:
    """``candidate`` with its per-image results on ``split`` (kept when it has them already)."""
    if candidate.outcomes is not None:
        return candidate
    return candidate.with_outcomes(predictions_on(candidate.ref, split, num_classes))


def near_the_top(candidates: list[Candidate], val: ArraySplit, num_classes: int) -> list[Candidate]:
    """``candidates`` with per-image validation results for those the unpaired interval cannot separate from
    the best (the only ones a paired comparison could matter for), so that :mod:`pipeline.selection` compares
    them image by image; scoring a handful of models on the validation split costs seconds."""
    ranked = rank(candidates)
    # Agresti–Caffo treats a score as a share of images: right for top-1 only. Balanced accuracy and macro-F1
    # vary more (a few minority images move them), so every completed candidate is scored image by image.
    close = {c.id for c in (tied_with_best(ranked) if ranked and ranked[0].metric == "top1" else ranked)}
    return [scored_on(c, val, num_classes) if c.id in close and len(close) > 1 else c for c in candidates]


def choose(
    p: PipelineConfig, candidates: list[Candidate], revalidate: Callable[[list[Candidate]], list[Candidate]]
) -> tuple[Pick, list[Candidate]]:
    """The pick (:func:`pipeline.selection.pick`), with the tied candidates re-validated first when
    ``tune.revalidate`` asks for it; ``revalidate(finalists)`` trains them on the extra folds and returns
    them re-validated. Returns the pick and the re-validated finalists (empty when none were)."""
    mode, at_most = p.tune.revalidate, p.tune.finalists
    finalists = (
        rank(candidates)[:at_most]
        if mode == "always"
        else selection_finalists(candidates, at_most)
        if mode == "auto"
        else []
    )
    if len(finalists) < 2:
        return pick(candidates), []
    scored = revalidate(finalists)
    by_id = {c.id: c for c in scored}
    return pick([by_id.get(c.id, c) for c in candidates]), scored


def revalidation(
    p: PipelineConfig,
    data: PreparedData,
    shared: SharedData,
    storage: str,
    name: str,
    callbacks: list,
    budget: TimeBudget | None = None,
) -> Callable[[list[Candidate]], list[Candidate]]:
    """The ``revalidate`` of :func:`choose` for a search stored at ``storage/name``: the finalists, scored on
    validation image by image, trained again on ``tune.finalist_folds`` extra folds (a grid of Ray Train
    runs, ``storage/name-finalists``, resumable like the search) and scored on each fold's held-out images.

    Under a time budget the re-validation spends what the search left of it: none left, or none left before
    every refit finished, and it returns no finalist (the tie then goes to the conservative rule, on
    validation alone)."""
    fs = storage_filesystem(storage)

    def revalidate(finalists: list[Candidate]) -> list[Candidate]:
        if budget is not None and budget.exhausted():
            print("no re-validation: the time budget is spent; the tie goes to the conservative rule", flush=True)
            return []
        classes = len(data.classes)
        finalists = [scored_on(c, data.val, classes) for c in finalists]  # revalidate: always may add unscored ones
        print(
            f"re-validating {', '.join(c.id for c in finalists)} on {p.tune.finalist_folds} more held-out folds",
            flush=True,
        )
        refits = build_finalist_tuner(p, shared, storage, f"{name}-finalists", finalists, callbacks, budget).fit()
        if budget is not None and budget.fired:
            print("the time budget ran out during re-validation: the tie goes to the conservative rule", flush=True)
            return []
        require_finished(
            refits,
            len(finalists) * p.tune.finalist_folds,
            f"re-validation interrupted; its state is stored at {redact(join_uri(storage, name + '-finalists'))}",
            p.train.epochs,
        )
        held_out = {
            fold: extra_fold(data.train, data.val, fold, p.data.seed)[1] for fold in range(1, p.tune.finalist_folds + 1)
        }

        def outcomes(fold: int, refit) -> Outcomes:
            model = None if refit is None else Checkpoint(refit.metrics["checkpoint_path"], filesystem=fs)
            return predictions_on(model, held_out[fold], classes)

        return cross_validated(finalists, refits, p.train.epochs, p.tune.metric, outcomes)

    return revalidate


def write_models(board: dict[str, dict], candidates: list[Candidate], folder: Path) -> None:
    """Each method's best model as a model file, ``folder/<method>.safetensors``, for the register stage to test."""
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {c.id: c for c in candidates}
    for method, entry in board.items():
        if entry["best_trial"] is not None:
            write_model_file(by_id[entry["best_trial"]].ref, folder / f"{method}.safetensors")
