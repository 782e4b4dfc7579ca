"""The ``drtune`` command: fine-tune once, predict with the result, export it.

    drtune fit --config params.yaml --set train.epochs=3 --set train.method=ce --output runs/ce
    drtune predict runs/ce photos/ extra.png --output predictions.csv
    drtune export runs/ce --output runs/ce/model.onnx

``fit`` writes ``<output>/config.yaml`` (resolved), ``last.pt`` (resumable checkpoint), ``model.pt``
(inference model state dict), ``metrics.json`` (per-epoch validation and the test of the last
epoch's model, the one tested everywhere; see :mod:`drtune.evaluation`). ``predict`` reads image
files (and folders, recursively, with torchvision's image extensions) and writes one CSV row per
image: path, label, probability. ``export`` writes the network as ONNX, checked against PyTorch
with onnxruntime (:mod:`drtune.export`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from drtune.backbones import data_config
from drtune.config import ConfigError, load_config
from drtune.data import build_loader
from drtune.evaluation import evaluate
from drtune.export import export_onnx
from drtune.inference import load_predictor, save_inference_checkpoint
from drtune.preflight import preflight
from drtune.sources import IMAGE_EXTENSIONS, load_splits
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
    torch.save(model.state_dict(), out / "model.pt")
    summary = {"history": result.history, "val_top1": last["val_top1"], "epochs": last["epoch"], "test": test_metrics,
               "n_train": len(train), "n_val": len(val), "n_test": len(test)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"val_top1": last["val_top1"], "test_top1": test_metrics["top1"]}))
    return 0


def _run_predictor(run: str):
    """The inference model of a ``drtune fit`` output folder (its ``last.pt``)."""
    checkpoint = Path(run) / "last.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: give the --output folder of a `drtune fit` run")
    with tempfile.TemporaryDirectory() as tmp:
        return load_predictor(save_inference_checkpoint(checkpoint, Path(tmp) / "inference.pt"))


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
    predictor = _run_predictor(args.run)
    files, images, bad = _image_files(args.images), [], []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError) as err:
            bad.append(f"{path} ({type(err).__name__})")
    if bad:
        raise ValueError(f"{len(bad)} file(s) are not readable images: " + "; ".join(bad))
    rows = []
    for start in tqdm(range(0, len(images), 256), desc="predict", disable=len(images) <= 256):
        proba = predictor.predict_proba(images[start:start + 256])
        rows += [{"path": str(files[start + i]), "label": predictor.classes[int(p.argmax())],
                  "probability": f"{float(p.max()):.6f}"} for i, p in enumerate(proba)]
    out = Path(args.output)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "probability"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} predictions written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    predictor = _run_predictor(args.run)
    out = Path(args.output or Path(args.run) / "model.onnx")
    # Any images check the export: seeded random ones at the trained size, as raw uint8.
    images = np.random.default_rng(0).integers(0, 256, (8, predictor.image_size, predictor.image_size, 3), np.uint8)
    check = export_onnx(predictor, out, images)
    print(json.dumps({"onnx": str(out), **check}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fit = sub.add_parser("fit", help="fine-tune once")
    p_fit.add_argument("--config", default=None, help="params.yaml to read (default: built-in defaults)")
    p_fit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p_fit.add_argument("--output", default="runs/fit", help="output directory (default: %(default)s)")
    p_fit.add_argument("--resume", action="store_true", help="continue from <output>/last.pt if present")
    p_predict = sub.add_parser("predict", help="classify image files with a fit run's model; write a CSV")
    p_predict.add_argument("run", help="the --output folder of a `drtune fit` run")
    p_predict.add_argument("images", nargs="+", help="image files or folders")
    p_predict.add_argument("--output", default="predictions.csv", help="CSV to write (default: %(default)s)")
    p_export = sub.add_parser("export", help="export a fit run's model as ONNX, checked with onnxruntime")
    p_export.add_argument("run", help="the --output folder of a `drtune fit` run")
    p_export.add_argument("--output", default=None, help="ONNX file to write (default: <run>/model.onnx)")
    args = parser.parse_args(argv)
    commands = {"fit": cmd_fit, "predict": cmd_predict, "export": cmd_export}
    try:
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"drtune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
