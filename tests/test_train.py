"""The training loop: exact resume, DDP banks across ranks, NaN failure, config errors, the CLI."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drtune import methods
from drtune.cli import main as cli_main
from drtune.config import ConfigError, load_config
from drtune.sources import few_label_splits, load_source
from drtune.train import fit

QUICK = [
    "data.dataset=digits",
    "data.labels_per_class=40",
    "model.name=test_efficientnet",
    "model.pretrained=none",
    "train.image_size=16",
    "train.batch_size=16",
    "train.epochs=3",
    "drtune.queue_size=64",
    "drtune.rotation_every=2",
    "train.progress=false",
]


def _data(seed: int = 0):
    raw = load_source("digits", seed=seed)
    train, val, _ = few_label_splits(raw, labels_per_class=40, label_fraction=None, val_fraction=0.25, seed=seed)
    return train, val, raw.classes


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("features,augment_on", [("online", "loader"), ("cached", "loader"), ("online", "device")])
def test_resume_continues_exactly_where_it_stopped(tmp_path, features: str, augment_on: str) -> None:
    params = load_config(None, [*QUICK, f"drtune.pretrained_features={features}", f"train.augment_on={augment_on}"])
    train, val, classes = _data()
    full = fit(params, train, val, classes, tmp_path / "full", resume=False).history

    def stop_after_two(metrics, _ckpt):
        if metrics["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(params, train, val, classes, tmp_path / "cut", report=stop_after_two)
    resumed = fit(params, train, val, classes, tmp_path / "cut", resume=True).history
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_top1"):
        assert resumed[2][key] == pytest.approx(full[2][key], rel=1e-6, abs=1e-7), key
    assert full[2]["train_loss"] != full[1]["train_loss"]


def test_checkpoints_every_n_epochs_and_resumes_from_the_last_one_written(tmp_path) -> None:
    """``train.checkpoint_every = 3`` over 5 epochs writes ``last.pt`` after epochs 3 and 5 only (the last is
    always written); a run cut after epoch 4 resumes from epoch 3's and ends where the uncut run did. The
    epoch rotation schedule (18 steps per epoch, every 4th batch: not the global schedule) survives it."""
    params = load_config(
        None,
        [
            *QUICK,
            "train.epochs=5",
            "train.checkpoint_every=3",
            "drtune.rotation_schedule=epoch",
            "drtune.rotation_every=4",
        ],
    )
    train, val, classes = _data()
    written = []

    def record(metrics, ckpt):
        written.append(ckpt and torch.load(ckpt, weights_only=True)["epoch"] + 1)

    full = fit(params, train, val, classes, tmp_path / "full", report=record, resume=False).history
    assert written == [None, None, 3, None, 5]

    def stop_after_four(metrics, _ckpt):
        if metrics["epoch"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(params, train, val, classes, tmp_path / "cut", report=stop_after_four)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] + 1 == 3  # epoch 4 is redone
    resumed = fit(params, train, val, classes, tmp_path / "cut", resume=True).history
    assert [m["epoch"] for m in resumed] == [1, 2, 3, 4, 5]
    for epoch in (3, 4):
        for key in ("train_loss", "val_loss", "val_top1"):
            assert resumed[epoch][key] == pytest.approx(full[epoch][key], rel=1e-6, abs=1e-7), (epoch, key)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] + 1 == 5


def test_a_step_budget_sets_the_epochs_and_the_cosine_spans_them(tmp_path) -> None:
    """``train.steps = 7`` with 3 steps per epoch (48 images, batch 16) trains ceil(7/3) = 3 epochs."""
    from drtune.data import ArraySplit
    from drtune.train import epochs_for_steps

    params = load_config(None, [*QUICK, "train.epochs=10", "train.steps=7"])
    train, val, classes = _data()
    small = ArraySplit(train.images[:50], train.labels[:50])  # 3 full batches of 16, the last 2 images dropped
    assert epochs_for_steps(params, len(small)) == 3
    assert epochs_for_steps(params, 100, world_size=2) == 3  # 50 images per worker: 3 steps each
    assert epochs_for_steps(load_config(None, QUICK), len(small)) == 3  # no budget: train.epochs
    with pytest.raises(ConfigError, match="train.batch_size = 16 exceeds the 15 training images per worker"):
        epochs_for_steps(params, 30, world_size=2)
    history = fit(params, small, val, classes, tmp_path, resume=False).history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["lr_head"] for h in history] == pytest.approx([0.1, 0.075, 0.025])  # a cosine over 3 epochs
    resolved = load_config(tmp_path / "config.yaml")
    assert (resolved.train.epochs, resolved.train.steps) == (3, 7)


def test_the_pipeline_resolves_a_step_budget_once_the_split_size_is_known() -> None:
    from pipeline.config import load

    p = load(None, [*QUICK, "train.steps=30", "tune.grace_period=3", "ray.workers_per_trial=2"])
    resolved = p.with_steps_resolved(300)  # 150 images per worker: 9 steps per epoch
    assert resolved.train.epochs == 4 and (p.train.epochs, resolved.train.steps) == (3, 30)  # p itself unchanged
    assert load(None, QUICK).with_steps_resolved(300).train.epochs == 3  # no budget: unchanged
    with pytest.raises(ConfigError, match=r"tune.grace_period = 3 exceeds train.epochs = 2 \(what train.steps = 30"):
        p.with_steps_resolved(600)  # 300 per worker: 18 steps per epoch


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    params = load_config(None, [*QUICK, "train.epochs=1", "drtune.queue_size=50"])  # 50: wraps mid-batch
    train, val, classes = _data()
    result = fit(params, train, val, classes, out, resume=False)
    bank = result.task.bank
    torch.save(
        {
            "pre": bank.pre,
            "down": bank.down,
            "labels": bank.labels,
            "ptr": bank.ptr,
            "count": bank.count,
            "head": result.task.model.head.weight.detach(),
            "val": result.history[-1]["val_top1"],
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_banks(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("pre", "down", "labels", "ptr", "count", "head"):
        assert torch.equal(a[key], b[key]), key
    assert a["val"] == b["val"]  # validation metrics are all-reduced
    # both ranks' batches went in: 300 training images = 150 per rank = 9 batches of 16 per rank;
    # warm-up wrote 2 gathered batches of 32 (64 rows >= K = 50), training 2 x 9 x 16 = 288 rows
    assert int(a["count"]) == 64 + 288
    assert int(a["ptr"]) == (64 + 288) % 50


def test_nan_loss_fails_with_a_clear_error(tmp_path) -> None:
    params = load_config(None, [*QUICK, "train.lr_backbone=10", "train.lr_head=100", "train.epochs=3"])
    train, val, classes = _data()
    with pytest.raises(FloatingPointError, match="loss became"):
        fit(params, train, val, classes, tmp_path, resume=False)


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.epochs=0", "train.epochs"),
        ("drtune.lam=-1", "drtune.lam"),
        ("train.method=sgd", "train.method"),
        ("train.lr_head=0", "train.lr_head"),
        ("drtune.bogus=1", "drtune.bogus"),
        ("drtune.rotation_timing=later", "drtune.rotation_timing"),
        ("drtune.rotation_timing=overlapped", "drtune.rotation_timing = overlapped needs drtune.rotation_between"),
    ],
)
def test_config_errors_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_both_label_budgets_is_an_error() -> None:
    with pytest.raises(ConfigError, match="labels_per_class"):
        load_config(None, ["data.label_fraction=0.1"])


def test_cli_fit_writes_metrics_and_resolved_config(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert (
        cli_main(
            [
                "fit",
                *sum((["--set", o] for o in QUICK), []),
                "--set",
                "train.epochs=1",
                "--set",
                "drtune.preset=reference",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and 0 <= metrics["test"]["top1"] <= 1
    resolved = (out / "config.yaml").read_text()
    assert "lam: 4.0" in resolved  # reference preset: λ = K/B = 64/16
    printed = capsys.readouterr().out  # fit's one line naming what the preset changed (1 + λ = 5)
    line = (
        "preset reference: train.lr_backbone 0.01 → 0.002, train.lr_head 0.1 → 0.01, train.weight_decay 0.0001 → "
        "0.0005, drtune.lam 1.0 → 4.0, drtune.rotation_schedule global → epoch\n"
    )
    assert line in printed and printed.count("preset ") == 1
    assert (out / "model.safetensors").exists() and (out / "last.pt").exists()
    assert cli_main(["fit", "--set", "train.epochs=-2", "--output", str(out)]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_cli_predicts_image_files_and_exports_onnx_that_onnxruntime_agrees_with(tmp_path, capsys) -> None:
    import csv

    import numpy as np
    from PIL import Image

    from drtune.inference import load_predictor, save_inference_checkpoint

    out = tmp_path / "run"
    assert (
        cli_main(["fit", *sum((["--set", o] for o in QUICK), []), "--set", "train.epochs=1", "--output", str(out)]) == 0
    )
    train, _, classes = _data()
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    arrays = [np.repeat(train.images[i], 3, axis=-1) for i in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert cli_main(["predict", str(out), str(tmp_path / "images"), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    predictor = load_predictor(save_inference_checkpoint(out / "last.pt", tmp_path / "from-last.safetensors"))
    expected = predictor.predict_proba(np.stack(arrays))  # the fit folder's model file is its last.pt's model
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["0.png", "1.png", "2.png"]  # notes.txt is not an image
    assert [r["label"] for r in rows] == [classes[i] for i in expected.argmax(1)]
    assert [float(r["probability"]) for r in rows] == pytest.approx(expected.max(1).tolist(), abs=1e-5)

    # The model file itself (what the pipeline writes as models/best.safetensors) predicts the same.
    assert cli_main(["predict", str(out / "model.safetensors"), str(folder), "--output", str(tmp_path / "f.csv")]) == 0
    assert [r["label"] for r in csv.DictReader(open(tmp_path / "f.csv"))] == [r["label"] for r in rows]

    capsys.readouterr()
    assert cli_main(["export", str(out), "--output", str(out / "model.onnx")]) == 0
    check = json.loads(capsys.readouterr().out)
    assert check["labels_equal"] and check["relative_diff"] <= check["tolerance"] and (out / "model.onnx").is_file()
    assert cli_main(["predict", str(tmp_path / "images"), str(folder)]) == 2  # a folder that holds no model
    assert "holds no model.safetensors" in capsys.readouterr().err

    Image.fromarray(np.zeros((2, 3000, 3), np.uint8)).save(folder / "long.png")  # 2 × 3,000: a decompression trap
    assert cli_main(["predict", str(out), str(folder / "long.png")]) == 2
    assert "long.png (3000 × 2 px is more elongated than 20:1" in capsys.readouterr().err
    (folder / "long.png").unlink()
    (folder / "3.png").write_bytes(b"not a png")
    assert cli_main(["predict", str(out), str(folder), "--output", str(tmp_path / "q.csv")]) == 2
    assert "3.png" in capsys.readouterr().err and not (tmp_path / "q.csv").exists()


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    train, val, classes = _data()
    fit(load_config(None, [*QUICK, "train.epochs=1"]), train, val, classes, tmp_path)
    with pytest.raises(ValueError, match=r"drtune\.lam: checkpoint 1\.0, now 2\.0"):
        fit(load_config(None, [*QUICK, "train.epochs=2", "drtune.lam=2.0"]), train, val, classes, tmp_path)


def test_misspelt_keys_and_sections_are_refused_naming_them(tmp_path) -> None:
    for override, named in (("trian.epochs=3", "trian"), ("train.epocs=3", r"train\.epocs")):
        with pytest.raises(ConfigError, match=named):
            load_config(None, [override])
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: 2\n  lr_bakbone: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr_bakbone = 0\.1: Extra inputs are not permitted"):
        load_config(bad)


def test_the_library_reads_the_pipeline_params_file(capsys) -> None:
    """``drtune fit --config params.yaml`` reads the library's sections and names the ones it leaves."""
    config = load_config("params.yaml")
    assert config.train.method == "drtune" and not hasattr(config, "tune")
    assert "sections mlflow, ray, tune are not read here" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["drtune", "ce", "linear_probe", "l2sp", "bss"])
def test_fit_under_a_callers_bf16_autocast(tmp_path, method: str) -> None:
    """Whole ``fit`` epochs inside ``torch.autocast("cpu", bfloat16)``, the dtype rules a CUDA run has."""
    config = load_config(None, [*QUICK, "train.epochs=1", f"train.method={method}", "drtune.rotation_every=1"])
    train, val, classes = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        history = fit(config, train, val, classes, tmp_path, resume=False).history
    assert all(torch.isfinite(torch.tensor(h[k])) for h in history for k in ("train_loss", "train_reg", "val_loss"))
    # A learning rate per trained group: the linear probe has no backbone rate
    assert ("lr_backbone" in history[0]) == methods.get(method).trains_backbone and history[0]["lr_head"] == 0.1


def test_a_finished_run_resumed_reports_its_last_epoch_again(tmp_path) -> None:
    """Interrupted after the last checkpoint but before the caller recorded the report: the
    resumed run trains nothing and hands the final epoch's metrics and checkpoint over again."""
    config = load_config(None, [*QUICK, "train.epochs=2"])
    train, val, classes = _data()
    first = []
    fit(config, train, val, classes, tmp_path, report=lambda m, c: first.append(dict(m)))
    again = []
    result = fit(config, train, val, classes, tmp_path, report=lambda m, c: again.append((dict(m), c)), resume=True)
    assert "checkpoint_s" in first[-1]  # the time that attempt took to write it: not part of the epoch's record
    assert [m["epoch"] for m, _ in again] == [2] and again[0][0] == {
        k: v for k, v in first[-1].items() if k != "checkpoint_s"
    }
    assert again[0][1] == tmp_path / "last.pt" and len(result.history) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=nosuchmodel_xyz", "model.name = 'nosuchmodel_xyz': timm has no such model"),
        ("model.pretrained=bundled", "model.pretrained = 'bundled': .*tf_efficientnet_lite0 only"),
        ("model.pretrained=/nonexistent/w.pth", "model.pretrained = '/nonexistent/w.pth': .*does not exist"),
    ],
)
def test_cli_rejects_bad_model_settings_in_one_line_before_loading_data(tmp_path, capsys, override, message) -> None:
    out = tmp_path / "run"
    assert cli_main(["fit", *sum((["--set", o] for o in QUICK), []), "--set", override, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (out / "config.yaml").exists()  # nothing ran


def test_garbage_checkpoint_and_truncated_resume_are_one_line_errors(tmp_path, capsys) -> None:
    garbage = tmp_path / "w.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert (
        cli_main(
            [
                "fit",
                *sum((["--set", o] for o in QUICK), []),
                "--set",
                f"model.pretrained={garbage}",
                "--output",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "weights_only=True" in capsys.readouterr().err
    out = tmp_path / "b"
    args = ["fit", *sum((["--set", o] for o in QUICK), []), "--set", "train.epochs=1", "--output", str(out)]
    assert cli_main(args) == 0
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "damaged, truncated" in err and "Traceback" not in err


def test_unwritable_output_and_full_disk_are_named(tmp_path, monkeypatch) -> None:
    from collections import namedtuple

    from drtune import preflight as pf

    config = load_config(None, QUICK)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--output = .* is not writable"):
        pf.preflight(config, blocker / "run")  # a folder inside a file cannot be made
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(ConfigError, match=r"--output = .*: 0 MiB free, but the checkpoints need about"):
        pf.preflight(config, tmp_path / "run")


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path) -> None:
    """A ``last.pt`` on shared storage that someone replaced: resuming (and the model file conversion) read
    tensors and numbers only, so the file's code never runs."""
    import pickle

    from drtune.inference import save_inference_checkpoint
    from drtune.train import load_checkpoint_state

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "last.pt"
    torch.save({"version": 2, "task": Payload()}, crafted, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match="holds more than tensors and numbers"):
        load_checkpoint_state(crafted)
    with pytest.raises(ValueError, match="holds more than tensors and numbers"):
        save_inference_checkpoint(crafted, tmp_path / "m.safetensors")
    assert not marker.exists()


def test_validation_every_third_epoch_keeps_the_rungs_and_the_last_and_hands_over_each_checkpoint(tmp_path) -> None:
    """train.validate_every = 3 over 7 epochs with a rung at 2: epochs 2, 3, 6 and 7 are validated and reported
    (nothing else), the history holds them alone, and the checkpoint written at epoch 4, which is not validated,
    is handed over with epoch 6's report; validation skipped changes nothing in the model trained."""
    train, val, classes = _data()
    reports = []
    config = load_config(None, [*QUICK, "train.epochs=7", "train.validate_every=3", "train.checkpoint_every=4"])
    sparse = fit(
        config,
        train,
        val,
        classes,
        tmp_path / "a",
        report=lambda m, c: reports.append((m["epoch"], c is not None)),
        validate_at={2},
    )
    assert reports == [(2, False), (3, False), (6, True), (7, True)]
    assert [h["epoch"] for h in sparse.history] == [2, 3, 6, 7]
    config.train.validate_every = 1
    every = fit(config, train, val, classes, tmp_path / "b")
    assert len(every.history) == 7 and every.history[-1]["val_top1"] == sparse.history[-1]["val_top1"]
    for a, b in zip(every.task.state_dict().values(), sparse.task.state_dict().values(), strict=True):
        assert torch.equal(a, b)
