"""Selection regret of a finished search: what choosing on the small validation split costs on test.

    python bench/regret.py [--params params.yaml] [--out bench/results/regret.json]

Reads the search the tune stage last ran (``models/best.json`` names its Ray experiment), tests the
final model of every trial that ran all epochs on the prepared test split, and prints a table: each
trial's validation and test top-1, the trial validation picks (the pipeline's rule: highest final
validation top-1, ties by lower validation loss) and the best trial on test. The regret is the
test accuracy the pick gives up against that best trial. The pipeline never looks at test while it
searches; only this benchmark does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def selection_regret(trials: list[dict]) -> float:
    """``max test_top1 − test_top1 of the validation pick`` over ``trials`` (dicts with ``val_top1``,
    ``val_loss``, ``test_top1``); the pick is the pipeline's rule."""
    pick = max(trials, key=lambda t: (t["val_top1"], -t["val_loss"]))
    return max(t["test_top1"] for t in trials) - pick["test_top1"]


def main() -> None:
    from ray.train import Checkpoint
    from ray.tune import ExperimentAnalysis

    from drtune.inference import load_predictor, save_inference_checkpoint
    from drtune.prepared import load_prepared
    from pipeline.cluster import storage_filesystem
    from pipeline.config import load
    from pipeline.training import read_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="bench/results/regret.json")
    args = parser.parse_args()
    p = load(args.params, [])
    chosen = json.loads(Path("models/best.json").read_text())
    test = load_prepared(Path(p.data.prepared_dir)).test
    path = chosen["experiment_path"]
    analysis = ExperimentAnalysis(path, storage_filesystem=storage_filesystem(path))
    trials = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        if last.get("epoch", 0) < p.train.epochs or "checkpoint_path" not in last:
            continue
        checkpoint = Checkpoint(last["checkpoint_path"], filesystem=storage_filesystem(path))  # the Train run's
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_inference_checkpoint(read_checkpoint(checkpoint, Path(tmp) / "last.pt"),
                                                Path(tmp) / "inference.pt")
            test_top1 = load_predictor(weights).score(test)["top1"]
        trials.append({"trial": trial.trial_id, "val_top1": last["val_top1"], "val_loss": last["val_loss"],
                       "test_top1": test_top1})
    pick = max(trials, key=lambda t: (t["val_top1"], -t["val_loss"]))
    best = max(trials, key=lambda t: t["test_top1"])
    print(f"{'trial':<10} {'val top-1':>9} {'val loss':>8} {'test top-1':>10}")
    for t in sorted(trials, key=lambda t: -t["val_top1"]):
        mark = " ← validation pick" if t is pick else (" ← best on test" if t is best else "")
        print(f"{t['trial']:<10} {t['val_top1']:>9.4f} {t['val_loss']:>8.4f} {t['test_top1']:>10.4f}{mark}")
    regret = selection_regret(trials)
    print(f"\nselection regret: {regret:.4f} test top-1 over {len(trials)} completed trials "
          f"({len(test)} test images; validation split {chosen.get('data_sha256', '')[:8]})")
    Path(args.out).write_text(json.dumps({"experiment": path, "trials": trials, "regret": regret}, indent=1))


if __name__ == "__main__":
    main()
