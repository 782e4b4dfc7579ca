"""Render the benchmark results in ``bench/results/`` as the Markdown tables the README shows.

    python bench/report.py            # every result file present
    python bench/report.py step       # one of: accuracy, calibration, step, search, datascale

The README's tables are pasted from this output, so no number is copied by hand.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def accuracy(res: dict, ablations: dict[str, dict], seeds: list[int] | None = None) -> None:
    """The method table and the ablation table (mean ± std over ``seeds``, default: every seed run)."""
    runs = res["runs"]
    seeds = seeds if seeds is not None else sorted({int(key.rsplit("/seed", 1)[1]) for key in runs})

    def of(prefix: str) -> list[dict]:
        return [runs[f"{prefix}/seed{s}"] for s in seeds if f"{prefix}/seed{s}" in runs]

    print("| method | validation top-1 | test top-1 | chosen on validation |\n|---|---|---|---|")
    for row, found in res["searches"].items():
        got = of(row)
        if got:
            chosen = ", ".join(f"{k} {v:.3g}" for k, v in found["config"].items())
            print(
                f"| {row} | {_mean_std([g['val_top1'] for g in got])} | {_mean_std([g['test_top1'] for g in got])} | {chosen} |"
            )
    print("\n| ablation (at DR-Tune's setting) | test top-1 |\n|---|---|")
    if of("ce"):
        print(f"| CE-tuning | {_mean_std([g['test_top1'] for g in of('ce')])} |")
    for label, switches in ablations.items():
        got = of("drtune" if not switches else f"ablation {label}")
        if got:
            print(f"| {label} | {_mean_std([g['test_top1'] for g in got])} |")


def calibration(res: dict) -> None:
    print(f"torch {res['torch']}, {res['threads']} threads; seconds per call\n")
    print(
        "| K | D | C | ref, rotation | ours, rotation | ratio | ref, no rotation | ours | ratio "
        "| per step /10: ref / ours | vs ref | ours vs f64 | ref vs f64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(
            f"| {r['K']} | {r['D']} | {r['C']} | {r['ref_rot_s']:.3f} | {r['ours_rot_s']:.3f} "
            f"| {r['ref_rot_s'] / r['ours_rot_s']:.1f} | {r['ref_norot_s']:.4f} | {r['ours_norot_s']:.4f} "
            f"| {r['ref_norot_s'] / r['ours_norot_s']:.1f} | {r['ref_every10_s']:.3f} / {r['ours_every10_s']:.3f} "
            f"| {r['max_rel_err']:.0e} | {r.get('ours_err_f64', float('nan')):.0e} | {r.get('ref_err_f64', float('nan')):.0e} |"
        )


def step(res: dict) -> None:
    print(f"{res['device']}; {res['image_size']} px, K = {res['queue_size']}; seconds per step\n")
    print("| backbone | batch | method | step | images/s | × CE | frozen forward | calibration | backward | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
        parts = " | ".join(
            f"{r['parts_s'][k]:.3f}" if k in r["parts_s"] else "–"
            for k in ("frozen forward", "calibration", "backward")
        )
        print(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} "
            f"| {r['ratio_to_ce']:.2f} | {parts} | {mfu} |"
        )


def search(res: dict) -> None:
    print("| arm | trials | stopped early | wall s | best validation top-1 |\n|---|---|---|---|---|")
    for arm, r in res["arms"].items():
        print(f"| {arm} | {r['trials']} | {r['stopped_early']} | {r['wall_s']:.1f} | {r['best_val_top1']:.4f} |")
    print(f"\nASHA: {res['speedup']:.2f}× the speed of the search without early stopping")


def datascale(res: dict) -> None:
    """Test top-1 (mean ± std over seeds) per method and labels per class, the chosen settings, and
    whether CE-tuning overfits: its final training CE, its best validation epoch against its last."""
    cells = sorted(res["cells"], key=int)
    runs = {n: res["cells"][n]["runs"] for n in cells}
    methods = list(dict.fromkeys(k.split("/")[0] for n in cells for k in runs[n]))
    print(f"settings: {res['settings']}\n")
    print("| method | " + " | ".join(f"{n} labels/class" for n in cells) + " |\n|---|" + "---|" * len(cells))
    for method in methods:
        row = []
        for n in cells:
            got = [r for k, r in runs[n].items() if k.split("/")[0] == method]
            tested = [r["test_top1"] for r in got if "test_top1" in r]
            cell = _mean_std(tested) if tested else "–"
            cell += " (1 seed)" if len(tested) == 1 else ""
            cell += f" ({len(got) - len(tested)} diverged)" if len(got) > len(tested) else ""
            row.append(cell)
        print(f"| {method} | " + " | ".join(row) + " |")
    print(
        "\n| labels/class | method | chosen setting (trial) | epochs | final train CE | best val top-1 (epoch) | last val top-1 |"
        "\n|---|---|---|---|---|---|---|"
    )
    for n in cells:
        for method, found in res["cells"][n]["searches"].items():
            run = runs[n].get(f"{method}/seed0", {})
            if "history" not in run:
                continue
            h = run["history"]
            best = max(h, key=lambda e: e["val_top1"])
            point = ", ".join(f"{k} {v}" if k == "queue_size" else f"{k} {v:.3g}" for k, v in found["point"].items())
            print(
                f"| {n} | {method} | {point} ({found['trial']}) | {h[-1]['epoch']} | {h[-1]['train_ce']:.4f} "
                f"| {best['val_top1']:.3f} ({best['epoch']}) | {h[-1]['val_top1']:.3f} |"
            )
    devices = {}
    for n in cells:
        for key, run in runs[n].items():
            devices.setdefault(run.get("device", "?"), []).append(f"{n}:{key}")
    if len(devices) > 1:
        for device, keys in devices.items():
            print(
                f"\nran on {device}: {len(keys)} of the runs above"
                + (f" ({', '.join(keys)})" if len(keys) <= 12 else "")
            )
    machines = "; ".join(f"{m}: {s / 60:.1f} min" for m, s in res.get("machines", {}).items())
    print(f"\nwall time: {res['wall_s'] / 60:.1f} min ({machines})")


def main() -> None:
    # imported here, not at the top: accuracy.py prints its tables through this module
    from accuracy import ABLATIONS

    renderers = {
        "accuracy": lambda res: accuracy(res, ABLATIONS),
        "calibration": calibration,
        "step": step,
        "search": search,
        "datascale": datascale,
    }
    for name in sys.argv[1:] or list(renderers):
        for variant in (name, f"{name}-quick"):
            res = _load(variant)
            if res is not None:
                print(f"\n### {variant}\n")
                renderers[name](res)


if __name__ == "__main__":
    main()
