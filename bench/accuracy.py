"""Accuracy: DR-Tune against the baselines and the paper's ablations, each method tuned equally.

    python bench/accuracy.py            # ImageNet Lite0 → Fashion-MNIST, 60 labels/class (params.yaml)
    python bench/accuracy.py --quick    # digits + a tiny random model (configs/quick.yaml): a smoke check

For every method (linear probe, CE-tuning, L2-SP, BSS, DR-Tune, DR-Tune with the authors'
``reference`` parametrisation) the pipeline's search machinery (Ray Tune, Optuna TPE, ASHA) runs
a search of the same size over that method's own hyperparameters on the validation split,
starting from the method's defaults. The chosen setting is then trained with 3 seeds; each run's
last-epoch model (the one rule for the tested model, see :mod:`drtune.evaluation`) is scored once
on the test split.
The ablations (Tables 6 and 7 of the paper: CE, CE + DR, CE + DR + SC, and SC without rotation,
translation or confidence weights) re-use DR-Tune's chosen setting with one switch changed; so
does the accuracy cost of ``drtune.pretrained_features: cached`` (features of un-augmented
images computed once, which removes the frozen forward pass from every step).

Everything lands in ``runs/bench/accuracy/`` and ``bench/results/accuracy[-quick].json`` as it
finishes; re-running skips finished runs and resumes an interrupted search (Tuner.restore).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from report import accuracy as print_tables

from drtune.backbones import data_config
from drtune.config import Config
from drtune.data import build_loader
from drtune.evaluation import evaluate
from drtune.prepared import load_prepared, write_prepared
from drtune.train import fit
from pipeline.cluster import start_ray
from pipeline.config import PipelineConfig, load
from pipeline.search import build_tuner, require_finished, trial_candidates
from pipeline.selection import rank
from pipeline.space import trial_config
from pipeline.training import share_data

# Budget of the full run (stated in the README): 64 px, 6 epochs, batch 32, 4 trials per search
# (ASHA: every trial gets 2 epochs, the top third goes on to 6), 3 seeds. About 55 minutes on 2 CPU cores.
FULL = [
    "train.epochs=6",
    "tune.num_samples=4",
    "tune.grace_period=2",
    "tune.reduction_factor=3",
    "tune.startup_trials=1",
    "train.progress=false",
    "ray.cpus_per_worker=2",
]
QUICK = ["tune.num_samples=2", "tune.startup_trials=1", "train.progress=false"]
DEFAULT_POINTS = {
    "linear_probe": {"lr_head": 0.1},
    "ce": {"lr_backbone": 0.01, "lr_head": 0.1},
    "l2sp": {"lr_backbone": 0.01, "lr_head": 0.1, "l2sp_alpha": 0.01, "l2sp_beta": 0.01},
    "bss": {"lr_backbone": 0.01, "lr_head": 0.1, "bss_eta": 0.001},
    "drtune": {"lr_backbone": 0.01, "lr_head": 0.1, "lam": 1.0, "queue_size": 1024},
    "drtune-reference": {"lr_backbone": 0.01, "queue_size": 1024},
}
ABLATIONS = {  # the paper's Tables 6 and 7 at DR-Tune's chosen setting (drtune.* switches), then our option
    "CE + DR (no calibration)": {"sc": False},
    "CE + DR + SC (DR-Tune)": {},
    "SC without rotation": {"rotate": False},
    "SC without translation": {"translate": False},
    "SC without confidence weights": {"confidence": False},
    "cached pretrained features": {"pretrained_features": "cached"},  # not in the paper: no frozen forward per step
}


def row_config(base: PipelineConfig, row: str) -> PipelineConfig:
    p = base.model_copy(deep=True)
    p.train.method = "drtune" if row.startswith("drtune") else row
    p.drtune.preset = "reference" if row == "drtune-reference" else "custom"
    point = dict(DEFAULT_POINTS[row])
    if "queue_size" in point and point["queue_size"] not in p.tune.queue_sizes:
        point["queue_size"] = p.tune.queue_sizes[-1]
    p.tune.points_to_evaluate = [point]
    return p


def search(p: PipelineConfig, work: Path, name: str) -> dict:
    """The method's search on validation: the chosen hyperparameters, their validation top-1, wall time.
    An interrupted search (Ctrl-C: Tune saves its state and returns) is not a result; the next call resumes it."""
    started = time.time()
    data = share_data(load_prepared(work / p.data.prepared_dir))
    results = build_tuner(p, data, str(work / "ray"), name, callbacks=[]).fit()
    require_finished(results, p.tune.num_samples, f"search {name} interrupted; the next invocation resumes it")
    ranked = rank(trial_candidates(results, p.train.epochs, 1, p.train.method))
    if not ranked:
        raise RuntimeError(f"search {name}: no trial completed all {p.train.epochs} epochs")
    best = ranked[0]  # the best validation score (ties: lower loss); the pipeline's rank
    return {"config": best.config, "val_top1": best.val_score, "wall_s": round(time.time() - started, 1)}


def train_and_test(config: Config, work: Path, out_name: str) -> dict:
    """One seed: fit, score the last epoch's model once on test."""
    data = load_prepared(work / config.data.prepared_dir)
    result = fit(config, data.train, data.val, data.classes, work / "runs" / out_name, resume=False)
    model = result.task.inference_model()
    loader = build_loader(data.test, data_config(model.encoder), config.train.image_size, 256, train=False)
    scores = evaluate(model, loader, next(model.parameters()).device)
    last = result.history[-1]
    return {"val_top1": last["val_top1"], "epochs": last["epoch"], "test_top1": scores["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_POINTS))
    args = parser.parse_args()
    base = load("configs/quick.yaml" if args.quick else "params.yaml", QUICK if args.quick else FULL)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    tag = "accuracy-quick" if args.quick else "accuracy"
    work = Path("runs/bench") / tag
    base.data.prepared_dir = "data/prepared"
    base.ray.storage_path = str((work / "ray").resolve())
    results_path = Path("bench/results") / f"{tag}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"searches": {}, "runs": {}}

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))

    if not (work / "data/prepared/stats.json").exists():
        cfg = base.data.model_copy()
        cfg.prepared_dir = str(work / "data/prepared")
        write_prepared(cfg)
    start_ray(base)
    started = time.time()
    for row in args.rows:
        p = row_config(base, row)
        if row not in results["searches"]:
            results["searches"][row] = search(p, work.resolve(), f"search-{row}")
            save()
        chosen = trial_config(p, results["searches"][row]["config"])
        for seed in seeds:
            key = f"{row}/seed{seed}"
            if key not in results["runs"]:
                chosen.train.seed = seed
                results["runs"][key] = train_and_test(chosen, work, key.replace("/", "-"))
                save()
                print(f"{key}: {results['runs'][key]}", flush=True)
    if "drtune" in results["searches"]:
        dr = trial_config(row_config(base, "drtune"), results["searches"]["drtune"]["config"])
        for label, switches in ABLATIONS.items():
            for seed in seeds:
                key = f"ablation {label}/seed{seed}"
                if key in results["runs"] or (not switches and f"drtune/seed{seed}" in results["runs"]):
                    continue
                p = dr.model_copy(deep=True)
                for field, value in switches.items():
                    setattr(p.drtune, field, value)
                p.train.seed = seed
                results["runs"][key] = train_and_test(p, work, key.replace("/", "-").replace(" ", "_"))
                save()
                print(f"{key}: {results['runs'][key]}", flush=True)
    results["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    results["wall_s_this_invocation"] = round(time.time() - started, 1)
    save()
    print_tables(results, ABLATIONS, seeds)


if __name__ == "__main__":
    main()
