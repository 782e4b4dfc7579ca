"""Does a soup beat the pick? Greedy and uniform soups against the best single model, on test.

    python bench/soup.py                     # params.yaml's problem (Lite0 → Fashion-MNIST, 60 labels/class), 3 seeds
    python bench/soup.py --seeds 0 --trials 2 --set train.epochs=2      # a smoke run

Per seed (``data.seed``: another labelled sample and validation split) the candidates of a search are
trained to the end in this process, without Ray: the CE baseline at params.yaml's rates, the search's
starting point, and ``--trials`` more points drawn as the search draws them before TPE
(:func:`pipeline.space.random_point`, seeded). The pick is the best on validation (``tune.metric``;
ties: lower loss), as :func:`pipeline.selection.rank` orders them; then :mod:`drtune.soup` makes the
greedy soup (best first, kept while validation does not fall) and the uniform soup of all of them.
Each of the three is scored once on the test split. Writes ``bench/results/soup.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from tqdm import tqdm

from drtune import methods
from drtune.inference import load_predictor, save_inference_checkpoint
from drtune.model_file import read_model
from drtune.prepared import load_prepared, write_prepared
from drtune.soup import greedy, soup
from drtune.train import fit
from pipeline.config import load
from pipeline.space import random_point, starting_points, trial_config


def candidates(p, trials: int, seed: int) -> list[tuple[str, object]]:
    """(name, library Config) of every candidate: the CE baseline, the starting point, ``trials`` random points."""
    base = p.library()
    base.train.method, base.train.progress = methods.PLAIN, False
    out = [("baseline", base)]
    points = starting_points(p)[:1]
    rng = random.Random(seed)
    points += [random_point(p, rng) for _ in range(trials)]
    out += [(f"trial{i}", trial_config(p, point)) for i, point in enumerate(points)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=4, help="random points besides the starting point")
    parser.add_argument("--work", default="runs/bench/soup")
    args = parser.parse_args()
    p = load(args.params, args.set)
    metric = p.tune.metric
    rows, started = [], time.time()
    for seed in args.seeds:
        work = Path(args.work) / f"seed{seed}"
        ps = p.model_copy(deep=True)
        ps.data.seed = seed
        ps.data.prepared_dir = str(work / "prepared")
        write_prepared(ps.data)
        data = load_prepared(ps.data.prepared_dir)
        models, scores = [], []
        for name, config in tqdm(candidates(ps, args.trials, seed), desc=f"seed {seed}: candidates"):
            config.data.prepared_dir = ps.data.prepared_dir
            result = fit(config, data.train, data.val, data.classes, work / name, resume=True)
            model = read_model(save_inference_checkpoint(work / name / "last.pt", work / f"{name}.safetensors"))
            val = load_predictor(model).score(data.val)
            models.append((name, model))
            scores.append((val[metric], val["loss"], len(scores)))
            del result
        order = [models[i] for *_, i in sorted(scores, key=lambda s: (-s[0], s[1], s[2]))]
        kept, trace, greedy_soup = greedy([m for _, m in order], lambda m: load_predictor(m).score(data.val)[metric])
        pick, uniform_soup = order[0][1], soup([m for _, m in order])
        test = {
            k: load_predictor(m).score(data.test)[metric]
            for k, m in (("pick", pick), ("greedy", greedy_soup), ("uniform", uniform_soup))
        }
        rows.append(
            {
                "seed": seed,
                "candidates": [n for n, _ in order],
                "greedy_ingredients": [order[i][0] for i in kept],
                "val_trace": trace,
                "val_pick": trace[0],
                "val_greedy": trace[kept[-1]],
                "val_uniform": load_predictor(uniform_soup).score(data.val)[metric],
                **{f"test_{k}": v for k, v in test.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{metric} on test ({p.model.name}, {p.data.dataset}, {p.data.labels_per_class} labels/class)")
    print(f"{'seed':>4} {'pick':>8} {'greedy soup':>12} {'uniform soup':>13}  greedy ingredients")
    for r in rows:
        print(
            f"{r['seed']:>4} {r['test_pick']:>8.4f} {r['test_greedy']:>12.4f} {r['test_uniform']:>13.4f}  "
            f"{' + '.join(r['greedy_ingredients'])}"
        )
    not_worse = sum(r["test_greedy"] >= r["test_pick"] for r in rows)
    print(f"greedy soup not worse than the pick on test: {not_worse} of {len(rows)} seeds")
    out = Path("bench/results/soup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "wall_s": round(time.time() - started),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
