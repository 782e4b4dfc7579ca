"""The ``drtune`` command: fine-tune once from ``params.yaml`` and write metrics.

    drtune fit --config params.yaml --set train.epochs=3 --set train.method=ce --output runs/ce

writes ``<output>/config.yaml`` (resolved), ``last.pt`` (resumable checkpoint), ``model.pt``
(inference model state dict), ``metrics.json`` (per-epoch validation and the test of the last
epoch's model, the one tested everywhere; see :mod:`drtune.evaluation`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from drtune.backbones import data_config
from drtune.config import ConfigError, load_config
from drtune.data import build_loader
from drtune.evaluation import evaluate
from drtune.preflight import preflight
from drtune.sources import load_splits
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fit = sub.add_parser("fit", help="fine-tune once")
    p_fit.add_argument("--config", default=None, help="params.yaml to read (default: built-in defaults)")
    p_fit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p_fit.add_argument("--output", default="runs/fit", help="output directory (default: %(default)s)")
    p_fit.add_argument("--resume", action="store_true", help="continue from <output>/last.pt if present")
    args = parser.parse_args(argv)
    try:
        return cmd_fit(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"drtune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
