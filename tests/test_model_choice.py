"""The search's choice of backbone (``tune.models``): validated at the edge, chosen first in the space, each
backbone with its own rungs, weights and preprocessing, and a quick search that trains both of two backbones."""

from __future__ import annotations

import json
from types import SimpleNamespace

import optuna
import pytest
import timm
import torch
from fresh_search import QUICK, run_search_script

from drtune.backbones import data_config
from drtune.config import ConfigError
from pipeline.config import PRETRAINED_WEIGHTS, load
from pipeline.early_stopping import MethodASHA, scheduler
from pipeline.pretrained import StartWeights, backbone_files
from pipeline.searcher import MethodSpace, search_space
from pipeline.space import largest_runs, starting_points, trial_config, unprefixed

TWO = "tune.models=[{name: test_efficientnet, pretrained: none}, {name: test_resnet, pretrained: none}]"


def test_a_choice_of_one_backbone_or_two_of_one_label_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"tune\.models.*two or more"):
        load(QUICK, ["tune.models=[{name: test_resnet}]"])
    with pytest.raises(ConfigError, match=r"tune\.models.*share a label"):
        load(QUICK, ["tune.models=[{name: test_resnet, label: a}, {name: test_vit, label: a}]"])
    with pytest.raises(ConfigError, match=r"tune\.models\[1\]\.pretrained = 'pretrain'.*pretrain\.method"):
        load(QUICK, ["tune.models=[{name: test_efficientnet}, {name: test_efficientnet, pretrained: pretrain}]"])


def test_labels_name_mlflow_metrics_so_a_label_mlflow_refuses_is_refused_and_a_file_stem_is_made_safe() -> None:
    with pytest.raises(ConfigError, match=r"labels \['resnet \(ssl\)'\]"):
        load(QUICK, ["tune.models=[{name: test_resnet, label: 'resnet (ssl)'}, {name: test_vit}]"])
    p = load(QUICK, ["tune.models=[{name: test_vit}, {name: test_vit, pretrained: /w/dino+ft.pth}]"])
    assert [c.label for c in p.tune.models] == ["test_vit/none", "test_vit/dino-ft"]


def test_a_trial_count_that_cannot_run_every_starting_point_is_refused() -> None:
    from pipeline.space import checked_starting_points

    p = load(QUICK, [TWO, "tune.points_to_evaluate=[{lam: 1.0}, {lam: 2.0}]", "tune.num_samples=3"])
    with pytest.raises(ConfigError, match=r"tune\.num_samples = 3 is fewer than the search's 4 starting points"):
        checked_starting_points(p)
    p.tune.num_samples = 4
    assert len(checked_starting_points(p)) == 4


def test_the_trial_ends_callback_restored_with_a_search_is_the_running_stages() -> None:
    """Tune restores the callbacks pickled with a search; the restored one must count into the live budget."""
    import pickle

    from pipeline.time_budget import TimeBudget, TrialEnds

    stored = pickle.dumps(TrialEnds(TimeBudget(60)))
    live = TrialEnds(TimeBudget(60, 10.0))  # the rerun's
    restored = pickle.loads(stored)
    restored.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))
    assert restored is live and live.budget.ended == {"t1"}


def test_one_model_twice_is_labelled_by_its_weights_and_model_star_is_found_among_the_choices(tmp_path) -> None:
    p = load(
        QUICK,
        [
            "tune.models=[{name: test_efficientnet, pretrained: none}, {name: test_efficientnet, pretrained: /w/moco.pth}]"
        ],
    )
    assert [c.label for c in p.tune.models] == ["test_efficientnet/none", "test_efficientnet/moco"]
    assert p.default_backbone() == "test_efficientnet/none"  # model.* is the first choice: the baseline's label
    other = load(QUICK, ["model.name=test_vit", TWO])
    assert other.default_backbone() == "test_vit"  # not among the choices: its own name


def test_bad_backbones_are_refused_before_ray_naming_their_entry(tmp_path) -> None:
    p = load(QUICK, ["tune.models=[{name: test_efficientnet}, {name: test_resnett}]"])
    from drtune.preflight import preflight

    with pytest.raises(ConfigError, match=r"tune\.models\[1\]\.name = 'test_resnett'.*closest: test_resnet"):
        for field, run in largest_runs(p):
            preflight(run, None, model_field=field)
    p = load(QUICK, [f"tune.models=[{{name: test_efficientnet}}, {{name: test_resnet, pretrained: {tmp_path}/x.pth}}]"])
    with pytest.raises(ConfigError, match=r"tune\.models\[1\]\.pretrained = .*x\.pth.*does not exist"):
        for field, run in largest_runs(p):
            preflight(run, None, model_field=field)
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), tmp_path / "x.pth")
    with pytest.raises(ConfigError, match=r"tune\.models\[1\]\.pretrained = .*does not fit backbone"):
        for field, run in largest_runs(p):
            preflight(run, None, model_field=field)


def test_the_backbone_is_drawn_first_and_sets_the_trials_model_and_preprocessing() -> None:
    p = load(QUICK, [TWO, "tune.points_to_evaluate=[{lam: 1.0}]"])
    assert search_space(p) == {}  # define-by-run: MethodSpace
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(20):
        trial = study.ask()
        MethodSpace(p)(trial)
        assert list(trial.params)[:2] == ["backbone", "method"]
        drawn.add(trial.params["backbone"])
    assert drawn == {"test_efficientnet", "test_resnet"}
    points = starting_points(p)  # every backbone starts from each point
    assert [(q["backbone"], q["drtune.lam"]) for q in points] == [("test_efficientnet", 1.0), ("test_resnet", 1.0)]
    config = trial_config(p, points[1])
    assert (config.model.name, config.model.pretrained) == ("test_resnet", "none")
    assert unprefixed(points[1]) == {"lr_head": 0.05, "lr_backbone": 0.01, "lam": 1.0, "queue_size": 64}
    # each backbone keeps its own preprocessing: timm's data config of the model the trial builds
    mean = {q["backbone"]: data_config(timm.create_model(trial_config(p, q).model.name))["mean"] for q in points}
    assert mean == {"test_efficientnet": (0.485, 0.456, 0.406), "test_resnet": (0.5, 0.5, 0.5)}


def test_each_backbone_has_its_own_rungs() -> None:
    asha = scheduler(load(QUICK, [TWO, "train.epochs=3", "tune.grace_period=1", "tune.reduction_factor=2"]))
    assert isinstance(asha, MethodASHA)
    asha.set_search_properties("val_top1", "max")

    def trial(i: int, backbone: str) -> SimpleNamespace:
        return SimpleNamespace(
            trial_id=str(i), config={"backbone": backbone, "method": "drtune", "drtune.lam": 0.5 + i}
        )

    slow = [trial(i, "test_resnet") for i in range(2)]
    fast = trial(9, "test_efficientnet")
    for t in (*slow, fast):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, fast, {"epoch": 1, "val_top1": 0.9}) == asha.CONTINUE
    # the resnet trials meet only each other at the rung: the efficientnet's 0.9 does not stop a 0.3
    assert asha.on_trial_result(None, slow[0], {"epoch": 1, "val_top1": 0.3}) == asha.CONTINUE
    assert asha.on_trial_result(None, slow[1], {"epoch": 1, "val_top1": 0.2}) == asha.STOP


def test_local_weights_travel_by_the_name_the_trial_config_gives_them(tmp_path) -> None:
    weights = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    p = load(QUICK, [f"tune.models=[{{name: test_efficientnet}}, {{name: test_resnet, pretrained: {weights}}}]"])
    files, digest = backbone_files(p, StartWeights(b"moco", "s"), tmp_path)
    assert files == {PRETRAINED_WEIGHTS: b"moco", str(weights): weights.read_bytes()}
    assert trial_config(p, {"backbone": "test_resnet"}).model.pretrained in files
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert backbone_files(p, StartWeights(b"moco", "s"), tmp_path)[1] != digest  # a changed file: a new search


SEARCH = """
def read_then_remove(p, start, root):
    # the driver reads the weight files, then they are gone: the workers can only train from the bytes sent
    out = read(p, start, root)
    Path(sys.argv[4]).unlink()
    return out


read, tune.backbone_files = tune.backbone_files, read_then_remove
p = settings(sys.argv[3], "tune.num_samples=2", "train.epochs=2", "tune.grace_period=1", "tune.points_to_evaluate=[{}]",
             "tune.revalidate=never")
tune.run(p, root)
"""


@pytest.mark.slow
def test_a_quick_search_chooses_between_two_backbones_one_from_a_local_file(tmp_path) -> None:
    """Both backbones train (each from its starting point), the local file reaches the workers through the
    object store (it is removed once the driver has read it), and the outputs name each trial's backbone and
    the best per backbone."""
    weights = tmp_path / "weights" / "resnet.safetensors"
    weights.parent.mkdir()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(weights))
    models = (
        f"tune.models=[{{name: test_efficientnet, pretrained: none}}, {{name: test_resnet, pretrained: {weights}}}]"
    )
    done = run_search_script(SEARCH, tmp_path, models, str(weights))
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((tmp_path / "models" / "best.json").read_text())
    board = best["backbones"]
    assert set(board) == {"test_efficientnet", "test_resnet"}
    assert all(e["completed"] == 1 and 0 < e["best_val_top1"] <= 1 for e in board.values()), board
    assert [e["trials"] for e in board.values()] == [1, 1]  # no baseline stage ran here: trials only
    assert best["best_backbone"] in board
    landscape = (tmp_path / "metrics" / "landscape.csv").read_text().splitlines()
    assert landscape[0].startswith("trial,backbone,method")
    assert sorted(row.split(",")[1] for row in landscape[1:]) == ["test_efficientnet", "test_resnet"]
    numbers = json.loads((tmp_path / "metrics" / "leaderboard.json").read_text())
    assert numbers["backbone.test_resnet.completed"] == 1
    # the model released is the chosen backbone's, with its weights' name in its params
    from drtune.model_file import read_metadata

    params = read_metadata(tmp_path / "models" / "best.safetensors")["params"]
    chosen = {"test_efficientnet": ("test_efficientnet", "none"), "test_resnet": ("test_resnet", str(weights))}
    assert (params["model"]["name"], params["model"]["pretrained"]) == chosen[best["best_backbone"]]
