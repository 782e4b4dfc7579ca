"""The ``tune`` stage's soup (``tune.soup``): the picked model averaged with the search's other finished models.

:mod:`drtune.soup` averages; this module chooses the ingredients. They are the completed candidates in
the pick's order (the pick first, then the others best first on validation): every trial that ran all
its epochs and the CE baseline, those fine-tuned from the same pretrained weights of the same backbone
as the pick (with ``tune.models``, the others cannot be averaged with it).
Each soup is scored on the validation split with ``tune.metric``, on the driver:

* ``greedy``: a candidate joins when the soup does not fall on validation, so the soup scores at
  least what the pick alone scores there; when nothing joins, the pick stands alone (no soup);
* ``uniform``: every candidate, whatever validation says.

The soup is chosen on the validation split alone. The re-validated finalists' extra folds are not
used: a soup scored there would be a soup of the fold-trained models, not of the models released.
Validation is small (120 images at the defaults), which is why greedy never lets a soup lose to the
pick there, and why the soup's test score is reported beside the pick's (``register``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from drtune.data import ArraySplit
from drtune.inference import load_predictor
from drtune.model_file import ModelFile, read_model
from drtune.soup import greedy, soup
from pipeline.choosing import write_model_file
from pipeline.config import PipelineConfig
from pipeline.selection import Pick


def make_soup(p: PipelineConfig, chosen: Pick, val: ArraySplit) -> tuple[ModelFile | None, dict | None]:
    """(the soup's model file, its record) for ``tune.soup``; (None, the record) when greedy keeps the pick
    alone; (None, None) with ``tune.soup: off``, a single completed candidate, or a pick that is plain fine-tuning
    by the conservative rule (a tie it won because it is the safe choice)."""
    recipe, metric = p.tune.soup, p.tune.metric
    backbone = chosen.chosen.backbone  # weights average only across fine-tunings of one architecture and start
    order = [c for c in chosen.order if c.ref is not None and c.backbone == backbone]
    if recipe == "off" or len(order) < 2:
        return None, None
    if chosen.rule == "conservative" and chosen.chosen.baseline:
        # the tie went to plain fine-tuning on purpose: mixing the tied trials back in would undo that choice
        print("soup: none, plain fine-tuning won a tie by the conservative rule and stands alone", flush=True)
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        models = [read_model(write_model_file(c.ref, Path(tmp) / f"{i}.safetensors")) for i, c in enumerate(order)]

    def score(model: ModelFile) -> float:
        return load_predictor(model).score(val)[metric]

    if recipe == "greedy":
        kept, trace, result = greedy(models, score)
        single, soup_score = trace[0], trace[kept[-1]]
        tried = [{"candidate": c.id, f"val_{metric}_with_it": s} for c, s in zip(order, trace, strict=True)]
    else:
        kept, tried, result = list(range(len(models))), [], soup(models)
        single, soup_score = score(models[0]), score(result)
    result = result if len(kept) > 1 else None
    record = {
        "recipe": recipe,
        "ingredients": [order[i].id for i in kept],
        "tried": tried,
        f"val_{metric}": soup_score,
        f"pick_val_{metric}": single,
        "chosen_on": f"validation ({len(val)} images)",
    }
    return result, record
