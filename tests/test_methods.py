"""A method defined only here, in one spec, trains through ``fit`` and through a quick search."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from fresh_search import QUICK, run_search_script

from drtune import methods
from drtune.config import ConfigError, load_config
from drtune.sources import few_label_splits, load_source
from drtune.train import fit
from pipeline.config import load
from pipeline.space import ranges, searched_names, trial_config

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
    p = load(QUICK, ["train.method=head_decay"])
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


# The method exists only as this script defines it, in a fresh interpreter: never importable by a worker.
SEARCH = """
import torch.nn.functional as F
from drtune import methods

def head_decay_loss(task, features, logits, y):
    ce = F.cross_entropy(logits, y)
    reg = 0.5 * task.config.baselines.l2sp_beta * (task.model.head.weight ** 2).sum()
    return ce + reg, ce, reg

methods.register(methods.MethodSpec("head_decay", "head decay", "CE-tuning with a decayed head", head_decay_loss,
                                    knobs=(methods.Knob("head_decay", "baselines.l2sp_beta", 1e-3, 1e-1),)))
p = settings("tune.methods=[ce, head_decay]", "tune.num_samples=2", "train.epochs=1", "tune.grace_period=1",
             "tune.revalidate=never")
board = tune.run(p, root)["leaderboard"]
print("BOARD", board["head_decay"]["completed"], board["ce"]["completed"], board["head_decay"]["best_val_top1"])
"""


@pytest.mark.slow
def test_a_quick_search_over_a_method_registered_only_in_the_driver(tmp_path) -> None:
    """The spec travels to Ray's trial and training workers by value with the trial (drtune.methods.adopt)."""
    done = run_search_script(SEARCH, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    completed_mine, completed_ce, best = done.stdout.split("BOARD ")[1].split()
    assert (completed_mine, completed_ce) == ("1", "1") and 0 < float(best) <= 1
