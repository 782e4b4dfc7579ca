"""A method defined only here, in one spec, trains through ``fit`` and through a quick search."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

from drtune import methods
from drtune.config import ConfigError, load_config
from drtune.sources import few_label_splits, load_source
from drtune.train import fit
from pipeline.config import load
from pipeline.space import ranges, searched_names, trial_config

REPO = Path(__file__).resolve().parent.parent
BETA = 0.05


def head_decay_loss(task, features, logits, y):
    """CE + β/2 ‖W_head‖², β read from the field the knob sets."""
    ce = F.cross_entropy(logits, y)
    reg = 0.5 * task.config.baselines.l2sp_beta * (task.model.head.weight**2).sum()
    return ce + reg, ce, reg


SPEC = methods.MethodSpec(
    "head_decay",
    "head decay",
    "CE-tuning with a decayed head",
    head_decay_loss,
    knobs=(methods.Knob("head_decay", "baselines.l2sp_beta", 1e-3, 1e-1),),
)


@pytest.fixture
def head_decay():
    methods.register(SPEC)
    yield SPEC
    methods.METHODS.pop(SPEC.name)


def test_an_unknown_method_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"train\.method.*unknown method 'head_decay'; known: drtune, ce"):
        load_config(None, ["train.method=head_decay"])


def test_a_registered_method_is_searched_over_its_own_knob_and_trains_with_its_loss(head_decay, tmp_path) -> None:
    p = load(REPO / "configs" / "quick.yaml", ["train.method=head_decay"])
    assert searched_names(p) == ["lr_head", "lr_backbone", "head_decay"]
    assert ranges(p)["head_decay"] == (1e-3, 1e-1)  # params.yaml has no tune.head_decay: the knob's own range
    config = trial_config(p, {"lr_head": 0.05, "lr_backbone": 0.01, "head_decay": BETA})
    assert config.baselines.l2sp_beta == BETA and config.train.method == "head_decay"
    config.train.epochs = 1
    raw = load_source("digits", seed=0)
    train, val, _ = few_label_splits(raw, labels_per_class=20, label_fraction=None, val_fraction=0.25, seed=0)
    result = fit(config, train, val, raw.classes, tmp_path)
    head = result.task.model.head.weight.detach()
    assert result.task.frozen is None and result.task.bank is None  # the spec keeps neither
    # The epoch's mean regulariser lies between the end-of-epoch value and the start's (the head shrinks).
    assert 0 < result.history[-1]["train_reg"] and result.history[-1]["train_loss"] > result.history[-1]["train_reg"]
    assert (
        abs(result.history[-1]["train_reg"] - 0.5 * BETA * float((head**2).sum()))
        < 0.5 * result.history[-1]["train_reg"]
    )


@pytest.mark.slow
def test_a_quick_search_over_a_method_registered_only_in_this_process(head_decay, tmp_path, monkeypatch) -> None:
    """The spec travels to Ray's trial and training workers by value: they never import this test module."""
    import ray.cloudpickle

    from drtune.prepared import write_prepared
    from pipeline import tune as tune_stage

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = load(
        REPO / "configs" / "quick.yaml",
        [
            "tune.methods=[ce, head_decay]",
            "tune.num_samples=2",
            "train.epochs=1",
            "tune.grace_period=1",
            "tune.revalidate=never",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    data = p.data.model_copy()
    data.prepared_dir = str(tmp_path / p.data.prepared_dir)
    write_prepared(data)
    summary = tune_stage.run(p, tmp_path)
    board = summary["leaderboard"]
    assert board["head_decay"]["completed"] == 1 and board["ce"]["completed"] == 1, board
    assert 0 < board["head_decay"]["best_val_top1"] <= 1
