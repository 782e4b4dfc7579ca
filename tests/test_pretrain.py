"""Self-supervised pretraining: exact resume, the weights fine-tuning loads, the kNN monitor, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from drtune.backbones import create_backbone
from drtune.config import ConfigError, load_config
from drtune.data import ArraySplit, build_loader
from drtune.pretrain import knn_top1, pretrain
from drtune.sources import few_label_splits, load_source
from drtune.train import build_task

QUICK = [
    "data.dataset=digits",
    "model.name=test_efficientnet",
    "model.pretrained=none",
    "train.image_size=16",
    "train.progress=false",
    "pretrain.method=moco",
    "pretrain.init=scratch",
    "pretrain.epochs=3",
    "pretrain.batch_size=16",
    "pretrain.queue_size=64",
]


def _data():
    raw = load_source("digits", seed=0)
    train, val, _ = few_label_splits(raw, labels_per_class=20, label_fraction=None, val_fraction=0.25, seed=0)
    return raw.train.images[:96], train, val, len(raw.classes)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["moco", "simclr"])
def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_result(tmp_path, method: str) -> None:
    config = load_config(None, [*QUICK, f"pretrain.method={method}"])
    unlabelled, train, val, classes = _data()
    full = pretrain(config, unlabelled, train, val, classes, tmp_path / "full", resume=False)

    def stop_after_two(metrics, _ckpt):
        if metrics["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(config, unlabelled, train, val, classes, tmp_path / "cut", report=stop_after_two)
    resumed = pretrain(config, unlabelled, train, val, classes, tmp_path / "cut")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[3]["ssl_loss"] == pytest.approx(full.history[3]["ssl_loss"], rel=1e-6)
    assert full.history[3]["ssl_loss"] != full.history[2]["ssl_loss"]
    a, b = load_file(tmp_path / "full" / "backbone.safetensors"), load_file(tmp_path / "cut" / "backbone.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_weights_load_strictly_as_the_fine_tuned_start_and_drtunes_frozen_copy(tmp_path) -> None:
    config = load_config(None, [*QUICK, "pretrain.epochs=1"])
    unlabelled, train, val, classes = _data()
    pretrain(config, unlabelled, train, val, classes, tmp_path)
    weights = tmp_path / "backbone.safetensors"
    saved = load_file(weights)
    # The same keys as the backbone fine-tuning builds: no projection head, no key encoder.
    assert saved.keys() == create_backbone("test_efficientnet", "none").state_dict().keys()
    with safe_open(str(weights), "pt") as f:
        info = json.loads(f.metadata()["drtune_pretrain"])
    assert info["method"] == "moco" and info["epochs"] == 1 and info["images"] == len(unlabelled)
    fine_tune = load_config(None, [*QUICK, f"model.pretrained={weights}", "train.method=drtune"])
    task, _, _ = build_task(fine_tune, classes)
    for part in (task.model.encoder, task.frozen):
        state = part.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    content = weights.read_bytes()  # a Ray worker on another node gets the bytes, not the file
    elsewhere = create_backbone("test_efficientnet", "/nowhere/backbone.safetensors", content=content)
    assert all(torch.equal(elsewhere.state_dict()[k], saved[k]) for k in saved)


def test_pretraining_moves_the_backbone_and_records_the_knn_monitor(tmp_path) -> None:
    config = load_config(None, [*QUICK, "pretrain.epochs=2"])
    unlabelled, train, val, classes = _data()
    result = pretrain(config, unlabelled, train, val, classes, tmp_path)
    assert [set(h) >= {"epoch", "knn_top1"} for h in result.history] == [True, True, True]
    assert all(0 <= h["knn_top1"] <= 1 for h in result.history)
    assert all(np.isfinite(h["ssl_loss"]) for h in result.history[1:])
    torch.manual_seed(0)  # pretrain.seed: the same random start
    start = create_backbone("test_efficientnet", "none").state_dict()
    trained = result.backbone.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start) is False


def test_knn_top1_on_planted_clusters_is_exact() -> None:
    """Two well-separated colours: every query's nearest labelled images share its class."""

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    rng = np.random.default_rng(0)
    images = np.concatenate([np.full((10, 8, 8, 3), (250, 10, 10)), np.full((10, 8, 8, 3), (10, 10, 250))])
    images = np.clip(images + rng.integers(-5, 5, images.shape), 0, 255).astype(np.uint8)
    labels = np.repeat([0, 1], 10)
    split = ArraySplit(images, labels)
    dcfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    loader = build_loader(split, dcfg, image_size=8, batch_size=8, train=False)
    assert knn_top1(MeanColour(), loader, loader, 2, 5, torch.device("cpu")) == 1.0
    flipped = ArraySplit(images, 1 - labels)
    assert (
        knn_top1(
            MeanColour(),
            loader,
            build_loader(flipped, dcfg, image_size=8, batch_size=8, train=False),
            2,
            5,
            torch.device("cpu"),
        )
        == 0.0
    )


def test_an_unknown_method_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.method"):
        load_config(None, ["pretrain.method=byol"])
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size"):
        load_config(None, ["pretrain.batch_size=1"])


@pytest.fixture
def prepared_project(tmp_path, monkeypatch):
    """The quick parameters with an unlabelled split of the digits beyond the label budget, prepared in ``tmp_path``."""
    from drtune.config import DataConfig
    from drtune.prepared import write_prepared

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "configs" / "quick.yaml").read_text())
    write_prepared(DataConfig(dataset="digits", labels_per_class=80, val_fraction=0.25, unlabelled="rest"))
    return tmp_path


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["pretrain.batch_size=5000"], "pretrain.batch_size = 5000"),
        (["pretrain.init=weights", "model.pretrained=none"], "pretrain.init = 'weights'"),
        (["data.unlabelled=none"], "holds no unlabelled split"),
        (["ray.workers_per_trial=2", "pretrain.batch_size=300"], "each of the 2 worker(s)"),
    ],
)
def test_bad_settings_are_refused_in_one_line_before_ray_starts(prepared_project, capsys, overrides, field) -> None:
    import ray

    from pipeline.pretrain import main

    if overrides == ["data.unlabelled=none"]:
        (prepared_project / "data" / "prepared" / "unlabelled.npz").unlink()
    args = ["--set", "pretrain.method=moco", "--set", "pretrain.init=scratch"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain: ") and field in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized()


def test_an_empty_unlabelled_split_is_refused(prepared_project, capsys) -> None:
    from pipeline.pretrain import main

    np.savez(prepared_project / "data" / "prepared" / "unlabelled.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
    assert main(["--set", "pretrain.method=simclr", "--set", "pretrain.init=scratch"]) == 2
    assert "the unlabelled split is empty" in capsys.readouterr().err


def test_method_none_passes_the_backbone_through(prepared_project) -> None:
    from pipeline.config import load
    from pipeline.pretrain import main
    from pipeline.pretrained import start_weights

    assert main([]) == 0
    record = json.loads((prepared_project / "models" / "pretrained" / "pretrain.json").read_text())
    assert (
        record["method"] == "none"
        and not (prepared_project / "models" / "pretrained" / "backbone.safetensors").exists()
    )
    p = load("params.yaml")
    assert start_weights(p).content is None and p.library().model.pretrained == p.model.pretrained


def test_the_cli_pretrains_then_fine_tunes_from_the_self_supervised_backbone(tmp_path, capsys) -> None:
    from drtune.cli import main as cli_main

    data = ["data.dataset=digits", "data.labels_per_class=20", "data.unlabelled=rest", "data.unlabelled_max=64"]
    common = [*data, "model.name=test_efficientnet", "model.pretrained=none", "train.image_size=16"]
    args = [f"--set={item}" for item in common]
    assert cli_main(["pretrain", *args, "--output", str(tmp_path / "ssl")]) == 2  # pretrain.method none
    assert "pretrain.method = 'none'" in capsys.readouterr().err
    ssl = [*args, "--set=pretrain.method=simclr", "--set=pretrain.init=scratch", "--set=pretrain.epochs=1"]
    assert cli_main(["pretrain", *ssl, "--set=pretrain.batch_size=16", "--output", str(tmp_path / "ssl")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert json.loads(printed[-1])["images"] == 64
    weights = tmp_path / "ssl" / "backbone.safetensors"
    fine_tune = [*args, f"--set=model.pretrained={weights}", "--set=train.epochs=1", "--set=train.batch_size=16"]
    assert cli_main(["fit", *fine_tune, "--set=train.method=ce", "--output", str(tmp_path / "ft")]) == 0


def test_moco_loss_is_infonce_against_the_queue_as_it_was_before_the_step(tiny_encoder) -> None:
    """Both views' queries meet the old queue only (never their own step's keys), and the step's 2B keys
    are queued after it: MoCo v2's symmetric loss, checked against InfoNCE written out by hand."""
    from drtune.self_supervised import Contrastive

    torch.manual_seed(0)
    model = Contrastive(tiny_encoder, "moco", projection_dim=8, queue_size=64, temperature=0.2).eval()
    bank = model.criterion.memory_bank
    old_queue, old_pointer = bank.bank.clone(), int(bank.bank_ptr)
    view0, view1 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    loss = model(view0, view1)  # eval: BatchNorm uses running statistics, so the grouping cannot matter

    def unit(x):
        return torch.nn.functional.normalize(x, dim=1)

    with torch.no_grad():
        q = unit(torch.cat([model.head(model.backbone(view0)), model.head(model.backbone(view1))]))
        k = unit(torch.cat([model.key_head(model.key_backbone(view1)), model.key_head(model.key_backbone(view0))]))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ unit(old_queue).T], dim=1) / 0.2
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(12, dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(bank.bank_ptr) == (old_pointer + 12) % 64  # both views' keys, queued after the step
    assert torch.allclose(bank.bank[old_pointer : old_pointer + 12], k, atol=1e-6)
