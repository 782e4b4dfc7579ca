"""Semantic calibration on a GPU: time and error against the float64 reference, per bank shape.

    python bench/gpu_parity.py [--out bench/results/gpu_parity.json]

For K × D banks (2048 × 2048, 1024 × 1280, 8192 × 2048, 2048 × 768; C = 100) it times ``semantic_calibrate``
with rotation on CUDA in float32 (the path a training step takes: thin QRs and a K × K SVD when
K ≤ D, else the D × D SVD; SVDs by the ``gesvda`` driver) and compares the result with the authors' algorithm
run in float64 on the same banks. The goal: an error no larger than the float32 CPU path's
(about 1e-6 where the problem is well-conditioned). Needs only torch and this repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from drtune.calibration import semantic_calibrate
from drtune.reference import reference_semantic_calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/gpu_parity.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for k, d in ((2048, 2048), (1024, 1280), (8192, 2048), (2048, 768)):
        gen = torch.Generator().manual_seed(0)
        labels = torch.arange(k) % 100
        pre = torch.randn(100, d, generator=gen)[labels] + 0.7 * torch.randn(k, d, generator=gen)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        down = pre @ q + 0.5 * torch.randn(k, d, generator=gen)
        head = torch.randn(100, d, generator=gen)
        ref = reference_semantic_calibrate(pre.double(), down.double(), labels, head.double(), 1.0)
        g = [t.to(device) for t in (F.normalize(pre, dim=1), F.normalize(down, dim=1), labels, head)]
        out = torch.empty_like(g[0])
        times = []
        for _ in range(args.repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            semantic_calibrate(*g, 1.0, normalized=True, out=out)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
        rows.append({"k": k, "d": d, "ms": 1000 * statistics.median(times[1:]), "rel_err_vs_float64": err})
        print(f"K {k:5d}  D {d:5d}  {rows[-1]['ms']:8.2f} ms  error {err:.2e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
