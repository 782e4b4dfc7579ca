"""Search efficiency: the tune stage with ASHA against the same search without early stopping.

    python bench/search.py            # params.yaml: 8 trials, Fashion-MNIST, Lite0 (about 25 minutes)
    python bench/search.py --quick --set tune.num_samples=6   # configs/quick.yaml, 6 trials (about 4 minutes)

Both arms use the same trials count, sampler seed, points to evaluate and data; they run one
after the other in one process, each in its own scratch folder (its own Ray storage and MLflow
store, so neither touches the project's). Prints wall time and the best validation top-1 each
reached, with the ratios, and writes bench/results/search[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from drtune.prepared import write_prepared
from pipeline import tune as tune_stage
from pipeline.config import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="e.g. tune.num_samples=6"
    )
    args = parser.parse_args()
    tag = "search-quick" if args.quick else "search"
    work = (Path("runs/bench") / tag).resolve()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    rows = {}
    for arm, early in (("ASHA", True), ("no early stopping", False)):
        root = work / arm.replace(" ", "-")
        shutil.rmtree(root, ignore_errors=True)
        p = load(
            "configs/quick.yaml" if args.quick else "params.yaml",
            [
                *args.set,
                f"tune.early_stopping={str(early).lower()}",
                "train.progress=false",
                f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            ],
        )
        cfg = p.data.model_copy()
        cfg.prepared_dir = str(root / p.data.prepared_dir)
        write_prepared(cfg)
        start = time.time()
        summary = tune_stage.run(p, root)
        rows[arm] = {
            "wall_s": round(time.time() - start, 1),
            "best_val_top1": summary["best_val_top1"],
            "completed": summary["completed"],
            "stopped_early": summary["stopped_early"],
            "trials": summary["trials"],
            "best_config": summary["best_config"],
        }
    a, b = rows["ASHA"], rows["no early stopping"]
    print(f"\n{'arm':20s} {'trials':>6s} {'stopped':>7s} {'wall s':>8s} {'best val top-1':>15s}")
    for arm, r in rows.items():
        print(f"{arm:20s} {r['trials']:6d} {r['stopped_early']:7d} {r['wall_s']:8.1f} {r['best_val_top1']:15.4f}")
    print(
        f"ASHA: {b['wall_s'] / a['wall_s']:.2f}x faster, best validation top-1 {a['best_val_top1'] - b['best_val_top1']:+.4f}"
    )
    out = Path("bench/results") / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arms": rows, "speedup": b["wall_s"] / a["wall_s"]}, indent=1))


if __name__ == "__main__":
    main()
