"""The ``drtune`` command: fine-tune once, predict with the result, export it.

    drtune fit --config params.yaml --set train.epochs=3 --set train.method=ce --output runs/ce
    drtune pretrain --config params.yaml --set pretrain.method=moco --set data.unlabelled=rest --output runs/ssl
    drtune fit --config params.yaml --set model.pretrained=runs/ssl/backbone.safetensors --output runs/ssl-ft
    drtune predict runs/ce photos/ extra.png --output predictions.csv
    drtune predict models/best.safetensors photos/
    drtune predict models:/drtune-fashion-mnist@champion photos/ --tracking-uri sqlite:///mlflow.db
    drtune export runs/ce --output runs/ce/model.onnx

``fit`` writes ``<output>/config.yaml`` (resolved), ``last.pt`` (resumable checkpoint),
``model.safetensors`` (the model file, :mod:`drtune.model_file`), ``metrics.json`` (per-epoch
validation and the test of the last epoch's model, the one tested everywhere; see
:mod:`drtune.evaluation`). ``pretrain`` self-supervises the backbone on ``data.unlabelled``
(:mod:`drtune.pretrain`) and writes ``<output>/backbone.safetensors``, which ``model.pretrained`` loads.
``predict`` and ``export`` take a model: a ``fit`` output folder, a
model file (``models/best.safetensors`` from the pipeline), or a registry URI ``models:/name@alias``
(or ``models:/name/version``; needs MLflow, ``pip install 'drtune[pipeline]'``). ``predict`` reads
image files (and folders, recursively, with torchvision's image extensions) and writes one CSV
row per image: path, label, probability. ``export`` writes the network as ONNX, checked against
PyTorch with onnxruntime (:mod:`drtune.export`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from drtune.backbones import data_config
from drtune.config import ConfigError, load_config
from drtune.data import build_loader, check_image_size
from drtune.evaluation import evaluate
from drtune.export import export_onnx
from drtune.inference import Predictor, load_predictor
from drtune.model_file import ModelFileError, save_model
from drtune.preflight import preflight
from drtune.pretrain import pretrain
from drtune.sources import IMAGE_EXTENSIONS, load_splits, load_unlabelled_split
from drtune.train import fit, pick_device


def cmd_fit(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    out = Path(args.output)
    preflight(config, out)
    raw, (train, val, test) = load_splits(config.data)
    result = fit(config, train, val, raw.classes, out, resume=args.resume)
    model = result.task.inference_model()
    last = result.history[-1]
    loader = build_loader(test, data_config(model.encoder), config.train.image_size, 256, train=False)
    test_metrics = evaluate(model, loader, pick_device(config.train.device))
    save_model(
        out / "model.safetensors",
        model.state_dict(),
        result.task.config.model_dump(mode="json"),  # resolved: the preset's numbers, train.steps' epochs
        raw.classes,
        result.history,
    )
    summary = {
        "history": result.history,
        "val_top1": last["val_top1"],
        "epochs": last["epoch"],
        "test": test_metrics,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"val_top1": last["val_top1"], "test_top1": test_metrics["top1"]}))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    if config.pretrain.method == "none":
        raise ConfigError("pretrain.method = 'none': choose moco or simclr (--set pretrain.method=moco)")
    if config.data.unlabelled == "none":
        raise ConfigError("data.unlabelled = 'none': set rest or a folder of images (--set data.unlabelled=rest)")
    if config.pretrain.init == "weights" and config.model.pretrained == "none":
        raise ConfigError("pretrain.init = 'weights': model.pretrained is none; set weights or pretrain.init=scratch")
    out = Path(args.output)
    preflight(config, out)
    raw, splits = load_splits(config.data)
    unlabelled = load_unlabelled_split(config.data, raw, splits)
    result = pretrain(config, unlabelled.images, splits[0], splits[1], len(raw.classes), out, resume=args.resume)
    first, last = result.history[0]["knn_top1"], result.history[-1]["knn_top1"]
    print(json.dumps({"images": len(unlabelled.images), "knn_top1_start": first, "knn_top1": last}))
    print(f"then: drtune fit --set model.pretrained={out / 'backbone.safetensors'} ...")
    return 0


def _predictor(source: str, tracking_uri: str | None) -> Predictor:
    """The model ``source`` names: a ``drtune fit`` folder, a model file, or a ``models:/`` registry URI."""
    if source.startswith("models:/"):
        return _registered(source, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"{source} holds no model.safetensors: give the --output folder of a finished "
                "`drtune fit` run, a model file such as models/best.safetensors, or models:/name@alias"
            )
    elif not path.is_file():
        raise FileNotFoundError(f"{source}: no such model file or folder")
    return load_predictor(path)


def _registered(uri: str, tracking_uri: str) -> Predictor:
    """The model file inside a registered MLflow model, downloaded from the registry at ``tracking_uri``."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise FileNotFoundError(f"{uri}: registry URIs need MLflow (pip install 'drtune[pipeline]')") from None
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise FileNotFoundError(f"{uri} at {tracking_uri}: {err.message}") from None
        files = sorted(local.rglob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{uri} holds no drtune model file (registered by an older release?)")
        return load_predictor(files[0].read_bytes())


def _image_files(paths: list[str]) -> list[Path]:
    files = []
    for given in map(Path, paths):
        if given.is_dir():
            files += sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif given.is_file():
            files.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    predictor = _predictor(args.model, args.tracking_uri)
    files, images, bad = _image_files(args.images), [], []
    for path in files:
        try:
            with Image.open(path) as img:
                check_image_size(*img.size)  # from the header, before decoding a pixel
                images.append(np.asarray(img.convert("RGB")))
        except ValueError as err:
            bad.append(f"{path} ({err})")
        except (OSError, Image.DecompressionBombError) as err:
            bad.append(f"{path} ({type(err).__name__})")
    if bad:
        raise ValueError(f"{len(bad)} file(s) are not readable images: " + "; ".join(bad))
    rows = []
    for start in tqdm(range(0, len(images), 256), desc="predict", disable=len(images) <= 256):
        proba = predictor.predict_proba(images[start : start + 256])
        rows += [
            {
                "path": str(files[start + i]),
                "label": predictor.classes[int(p.argmax())],
                "probability": f"{float(p.max()):.6f}",
            }
            for i, p in enumerate(proba)
        ]
    out = Path(args.output)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "probability"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} predictions written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    predictor = _predictor(args.model, args.tracking_uri)
    out = Path(args.output or "model.onnx")
    # Any images check the export: seeded random ones at the trained size, as raw uint8.
    images = np.random.default_rng(0).integers(0, 256, (8, predictor.image_size, predictor.image_size, 3), np.uint8)
    check = export_onnx(predictor, out, images)
    print(json.dumps({"onnx": str(out), **check}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fit = sub.add_parser("fit", help="fine-tune once")
    p_fit.add_argument("--config", default=None, help="params.yaml to read (default: built-in defaults)")
    p_fit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p_fit.add_argument("--output", default="runs/fit", help="output directory (default: %(default)s)")
    p_fit.add_argument("--resume", action="store_true", help="continue from <output>/last.pt if present")
    p_pre = sub.add_parser("pretrain", help="self-supervise the backbone on unlabelled images (MoCo v2, SimCLR)")
    p_pre.add_argument("--config", default=None, help="params.yaml to read (default: built-in defaults)")
    p_pre.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p_pre.add_argument("--output", default="runs/pretrain", help="output directory (default: %(default)s)")
    p_pre.add_argument("--resume", action="store_true", help="continue from <output>/last.pt if present")
    model_help = "a `drtune fit` output folder, a model file (models/best.safetensors) or models:/name@alias"
    uri_help = "MLflow store of models:/ URIs (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    p_predict = sub.add_parser("predict", help="classify image files with a trained model; write a CSV")
    p_predict.add_argument("model", help=model_help)
    p_predict.add_argument("images", nargs="+", help="image files or folders")
    p_predict.add_argument("--output", default="predictions.csv", help="CSV to write (default: %(default)s)")
    p_predict.add_argument("--tracking-uri", default=None, help=uri_help)
    p_export = sub.add_parser("export", help="export a trained model as ONNX, checked with onnxruntime")
    p_export.add_argument("model", help=model_help)
    p_export.add_argument("--output", default=None, help="ONNX file to write (default: model.onnx)")
    p_export.add_argument("--tracking-uri", default=None, help=uri_help)
    args = parser.parse_args(argv)
    commands = {"fit": cmd_fit, "pretrain": cmd_pretrain, "predict": cmd_predict, "export": cmd_export}
    try:
        return commands[args.command](args)
    except (
        ConfigError,
        FileNotFoundError,
        ModelFileError,
        ValueError,
    ) as err:  # bad input: one clear line, no traceback
        print(f"drtune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
