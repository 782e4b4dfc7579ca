"""Semantic-calibration cost: drtune against the authors' algorithm (class loop + full D × D SVD).

    python bench/calibration.py                      # K ∈ {2048, 8192}, D ∈ {768, 1280, 2048}, C ∈ {10, 100, 397}
    python bench/calibration.py --k 2048 --d 1280 2048 --c 100 --repeats 3

Prints median seconds per call of each, the ratio, and the max relative error against the
reference, with rotation and without, plus the average per-step cost when rotating every 10th
step (the reference schedule) and every step. Writes JSON to bench/results/calibration.json.
Both run in one process, interleaved, so machine noise hits them alike. Ours is timed as a
FineTuneTask calls it: on banks stored L2-normalised, writing into an output buffer reused every
step. Both float32 results are also compared with the reference computed in float64, which
says which one is off where they differ (ill-conditioned cross-covariances).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from drtune.calibration import semantic_calibrate
from drtune.reference import reference_semantic_calibrate


def banks(k: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Clustered pretrained features and a perturbed, rotated downstream copy (like a fine-tuned encoder)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k) % c
    pre = torch.randn(c, d, generator=gen)[labels] + 0.7 * torch.randn(k, d, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    down = pre @ q + 0.5 * torch.randn(k, d, generator=gen)
    return pre, down, labels, torch.randn(c, d, generator=gen)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--d", type=int, nargs="+", default=[768, 1280, 2048])
    parser.add_argument("--c", type=int, nargs="+", default=[10, 100, 397])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/calibration.json")
    args = parser.parse_args()
    rows = []
    header = (
        f"{'K':>5} {'D':>5} {'C':>4} | {'ref rot':>8} {'ours rot':>8} {'ratio':>6} | {'ref':>7} {'ours':>7} {'ratio':>6} | "
        f"{'ref /10':>8} {'ours /10':>8} | {'max err':>8} | {'ours f64':>8} {'ref f64':>8}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(header)
    print("-" * len(header))
    for k in args.k:
        for d in args.d:
            for c in args.c:
                pre, down, labels, head = banks(k, d, c)
                pre_n, down_n = F.normalize(pre, dim=1), F.normalize(down, dim=1)  # as a FeatureBank stores them
                out = torch.empty_like(pre_n)  # the output buffer a FineTuneTask reuses every step
                row = {"K": k, "D": d, "C": c}
                err = err64 = ref_err64 = 0.0
                for rotate in (True, False):
                    t_ref, ref = timed(
                        lambda: reference_semantic_calibrate(pre, down, labels, head, 3.0, rotate=rotate), args.repeats
                    )
                    t_our, our = timed(
                        lambda: semantic_calibrate(
                            pre_n, down_n, labels, head, 3.0, rotate=rotate, normalized=True, out=out
                        ),
                        args.repeats,
                    )
                    err = max(err, ((our - ref).norm() / ref.norm()).item())
                    # the same algorithm in float64: how far each float32 result is from it
                    exact = reference_semantic_calibrate(
                        pre.double(), down.double(), labels, head.double(), 3.0, rotate=rotate
                    )
                    err64 = max(err64, ((our.double() - exact).norm() / exact.norm()).item())
                    ref_err64 = max(ref_err64, ((ref.double() - exact).norm() / exact.norm()).item())
                    key = "rot" if rotate else "norot"
                    row.update({f"ref_{key}_s": t_ref, f"ours_{key}_s": t_our})
                row.update(max_rel_err=err, ours_err_f64=err64, ref_err_f64=ref_err64)
                row["ref_every10_s"] = (row["ref_rot_s"] + 9 * row["ref_norot_s"]) / 10
                row["ours_every10_s"] = (row["ours_rot_s"] + 9 * row["ours_norot_s"]) / 10
                rows.append(row)
                print(
                    f"{k:>5} {d:>5} {c:>4} | {row['ref_rot_s']:8.3f} {row['ours_rot_s']:8.3f} "
                    f"{row['ref_rot_s'] / row['ours_rot_s']:6.1f} | {row['ref_norot_s']:7.4f} {row['ours_norot_s']:7.4f} "
                    f"{row['ref_norot_s'] / row['ours_norot_s']:6.1f} | {row['ref_every10_s']:8.3f} "
                    f"{row['ours_every10_s']:8.3f} | {err:8.1e} | {err64:8.1e} {ref_err64:8.1e}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(
        f"seconds per call (median of {args.repeats}); 'ours rot' is rotation every step; "
        f"'/10' = average per step with rotation every 10th step; 'max err' = relative error of ours "
        f"against the float32 reference, 'ours f64' / 'ref f64' = of each against the reference run "
        f"in float64. JSON: {out}"
    )


if __name__ == "__main__":
    main()
