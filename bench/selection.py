"""Does the search ever deliver a model worse than plain fine-tuning? The pick against the CE baseline
and the selection regret, over datasets, searches and search seeds.

    python bench/selection.py                                   # 2 datasets × 2 searches × 3 seeds
    python bench/selection.py --datasets digits --seeds 0 --set train.epochs=6

For each dataset the prepare and baseline stages run once (the baseline does not depend on the
search), then each search with ``tune.seed`` = each seed, through the tune stage's own code
(:func:`pipeline.tune.run`, so the pick is the pipeline's: :mod:`pipeline.selection`):

* ``default``: DR-Tune alone, ``params.yaml``'s search;
* ``methods``: one search across ``drtune, ce, l2sp, linear_probe, bss`` (per-method rungs).

Then — what the pipeline itself never does — every candidate that ran every epoch (each trial and
the baseline) is tested on the test split, and each search is scored:

* **pick − CE**: the pipeline's pick against the CE baseline on test, with McNemar's p and whether
  the register stage's gate would promote it (it never promotes a model below the baseline);
* **regret** of a rule: the best test top-1 among the candidates minus the test top-1 of the rule's
  choice. Rules: the pipeline's pick, and the rule before it (the trial with the best validation top-1,
  the baseline not a candidate) on the same trials.

Everything lives under ``runs/bench/selection/`` (Ray storage, MLflow store, prepared data); a search
already scored is skipped on the next call. Results: ``bench/results/selection.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.selection import Candidate, rank
from pipeline.significance import paired_test

DATASETS = {"fashion-mnist": [], "digits": ["data.dataset=digits"]}
SEARCHES = {"default": [], "methods": ["tune.methods=[drtune, ce, l2sp, linear_probe, bss]"]}
OUT = Path("bench/results/selection.json")


def tested_candidates(chosen: dict, epochs: int, test, baseline_model: Path) -> tuple[list[dict], dict]:
    """Each trial of the search in ``chosen`` (a ``models/best.json``) that ran every epoch, and the baseline:
    validation scores and test top-1; and each one's per-image correctness on test (for the paired test)."""
    from ray.train import Checkpoint
    from ray.tune import ExperimentAnalysis

    from drtune.inference import load_predictor, save_inference_checkpoint
    from pipeline.cluster import storage_filesystem
    from pipeline.training import read_checkpoint

    path = chosen["experiment_path"]
    analysis = ExperimentAnalysis(path, storage_filesystem=storage_filesystem(path))
    rows, right = [], {}

    def score(name: str, weights: Path, row: dict) -> None:
        s = load_predictor(weights).score(test)
        right[name] = (np.asarray(s["predicted"]) == test.labels).tolist()
        rows.append(row | {"trial": name, "test_top1": s["top1"]})

    for trial in analysis.trials:
        last = trial.last_result or {}
        if last.get("epoch", 0) < epochs or "checkpoint_path" not in last or last.get("diverged"):
            continue
        checkpoint = Checkpoint(last["checkpoint_path"], filesystem=storage_filesystem(path))
        with tempfile.TemporaryDirectory() as tmp:
            weights = save_inference_checkpoint(
                read_checkpoint(checkpoint, Path(tmp) / "last.pt"), Path(tmp) / "i.safetensors"
            )
            score(
                trial.trial_id,
                weights,
                {
                    "method": trial.config.get("method", "drtune"),
                    "val_top1": last["val_top1"],
                    "val_loss": last["val_loss"],
                },
            )
    record = json.loads((baseline_model.parent / "baseline.json").read_text())
    score("baseline", baseline_model, {"method": "ce", "val_top1": record["val_top1"], "val_loss": record["val_loss"]})
    return rows, right


def scored(chosen: dict, rows: list[dict], right: dict) -> dict:
    """One search's numbers: the pick and the old rule against the best candidate on test and the baseline."""
    test = {r["trial"]: r["test_top1"] for r in rows}
    trials = [
        Candidate(id=r["trial"], method=r["method"], val_score=r["val_top1"], val_loss=r["val_loss"], n_val=1)
        for r in rows
        if r["trial"] != "baseline"
    ]
    old = rank(trials)[0].id
    pick = chosen["best_trial"]
    gate = paired_test(right[pick], right["baseline"])
    best = max(test.values())
    return {
        "pick": pick,
        "pick_method": chosen["best_method"],
        "rule": chosen["selection"]["rule"],
        "pick_test": test[pick],
        "baseline_test": test["baseline"],
        "pick_minus_ce": test[pick] - test["baseline"],
        "mcnemar_p": gate.p_value,
        "promotable": gate.only_b <= gate.only_a,
        "regret_pick": best - test[pick],
        "old_pick": old,
        "old_test": test[old],
        "old_minus_ce": test[old] - test["baseline"],
        "regret_old": best - test[old],
        "best_test": best,
        "candidates": rows,
        "revalidated": len(chosen["finalists"]),
    }


def table(results: dict) -> None:
    """Print each search and each (dataset, search)'s means."""
    print(
        "\n| dataset | search | seed | pick (rule) | pick test | CE test | pick − CE | McNemar p | gate | regret | "
        "old rule − CE | old regret |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    groups: dict = {}
    for key, r in sorted(results["searches"].items()):
        dataset, search, seed = key.split("/")
        groups.setdefault((dataset, search), []).append(r)
        print(
            f"| {dataset} | {search} | {seed} | {r['pick_method']} ({r['rule']}) | {r['pick_test']:.4f} | "
            f"{r['baseline_test']:.4f} | {r['pick_minus_ce']:+.4f} | {r['mcnemar_p']:.2g} | "
            f"{'promote' if r['promotable'] else 'held'} | {r['regret_pick']:.4f} | {r['old_minus_ce']:+.4f} | "
            f"{r['regret_old']:.4f} |"
        )
    print(
        "\n| dataset | search | searches | mean pick − CE | worst pick − CE | mean regret | mean old − CE | "
        "worst old − CE | mean old regret |\n|---|---|---|---|---|---|---|---|---|"
    )
    for (dataset, search), rs in sorted(groups.items()):

        def mean(k: str) -> float:
            return float(np.mean([r[k] for r in rs]))

        print(
            f"| {dataset} | {search} | {len(rs)} | {mean('pick_minus_ce'):+.4f} | {min(r['pick_minus_ce'] for r in rs):+.4f} "
            f"| {mean('regret_pick'):.4f} | {mean('old_minus_ce'):+.4f} | {min(r['old_minus_ce'] for r in rs):+.4f} "
            f"| {mean('regret_old'):.4f} |"
        )


def main() -> None:
    from drtune.prepared import load_prepared, write_prepared
    from pipeline import baseline, tune
    from pipeline.config import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="more params.yaml overrides for every run (key=value)")
    args = parser.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"settings": args.set, "searches": {}}
    if results["settings"] != args.set:
        raise SystemExit(f"{OUT} holds results of other settings ({results['settings']}); move it away first")
    for dataset in args.datasets:
        home = Path("runs/bench/selection").resolve() / dataset
        common = (
            DATASETS[dataset]
            + args.set
            + [
                "train.progress=false",
                f"data.prepared_dir={home / 'prepared'}",
                f"mlflow.tracking_uri=sqlite:///{home / 'mlflow.db'}",
                f"ray.storage_path={home / 'ray'}",
            ]
        )
        p = load(args.params, common)
        if not (home / "prepared" / "stats.json").is_file():
            write_prepared(p.data)
        if not (home / "models" / "baseline.json").is_file():
            baseline.run(p, home)
        test = load_prepared(home / "prepared").test
        for search in args.searches:
            for seed in args.seeds:
                key = f"{dataset}/{search}/{seed}"
                if key in results["searches"]:
                    continue
                root = home / f"{search}-{seed}"
                (root / "models").mkdir(parents=True, exist_ok=True)
                for name in ("baseline.safetensors", "baseline.json"):
                    (root / "models" / name).write_bytes((home / "models" / name).read_bytes())
                ps = load(args.params, common + SEARCHES[search] + [f"tune.seed={seed}"])
                started = time.time()
                chosen = tune.run(ps, root)
                rows, right = tested_candidates(chosen, ps.train.epochs, test, root / "models" / "baseline.safetensors")
                results["searches"][key] = scored(chosen, rows, right) | {"wall_s": round(time.time() - started, 1)}
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps(results, indent=1))
                r = results["searches"][key]
                print(
                    f"{key}: pick {r['pick']} ({r['rule']}) test {r['pick_test']:.4f}, CE {r['baseline_test']:.4f}, "
                    f"regret {r['regret_pick']:.4f} (old rule {r['regret_old']:.4f}), {r['wall_s']:.0f} s",
                    flush=True,
                )
    table(results)


if __name__ == "__main__":
    main()
