"""Does warm-starting an iterative polar decomposition from the last rotation save iterations? No.

The Newton–Schulz iteration ``Z ← Z (3I − ZᵀZ)/2`` acts on singular values only: started from
``Z₀ = S`` or from ``Z₀ = R_prevᵀ S`` (the last step's rotation undone) it applies the same scalar
map to the same singular values, so it needs the same number of iterations to the same error.
And the last rotation itself is no approximation: after B = 32 of K = 1024 bank rows change,
the Procrustes rotation moves a lot, because the directions of S's small singular values are
unstable. This script measures both on a synthetic bank pair (10 classes, K = 1024, D = 512,
float64), printing the rotated features' relative error against the
SVD's per iteration count, cold and warm.

    python bench/polar_warm_start.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K, D, CLASSES, B = 1024, 512, 10, 32


def centred_cross(pre: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (pre - pre.mean(0)).T @ (down - down.mean(0))


def polar_svd(s: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(s)
    u[:, -1] *= torch.sign(torch.linalg.det(s))
    return u @ vh


def newton_schulz(z: torch.Tensor, iterations: int) -> torch.Tensor:
    z = z / torch.linalg.matrix_norm(z, 2)
    for _ in range(iterations):
        z = 1.5 * z - 0.5 * z @ (z.T @ z)
    return z


def main() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(K) % CLASSES
    pre = torch.randn(CLASSES, D, generator=g, dtype=torch.float64)[labels] + 0.7 * torch.randn(
        K, D, generator=g, dtype=torch.float64
    )
    turn, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    down = F.normalize(pre @ turn + 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    pre = F.normalize(pre, dim=1)
    last = polar_svd(centred_cross(pre, down))
    # one training step: B rows of both banks replaced
    pre[:B] = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    down[:B] = F.normalize(pre[:B] @ turn + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    s = centred_cross(pre, down)
    x = pre - pre.mean(0)
    ref = x @ polar_svd(s)

    def error(rotation: torch.Tensor) -> float:
        return float((x @ rotation - ref).norm() / ref.norm())

    sv = torch.linalg.svdvals(s)
    print(f"K = {K}, D = {D}, B = {B}; condition number of S: {sv[0] / sv[-1]:.3g}")
    print(f"last step's rotation reused: error {error(last):.2e}")
    print(f"{'iterations':>10} {'cold: Z0 = S':>14} {'warm: Z0 = R_prevᵀS':>20}")
    for it in (10, 20, 30, 40, 80):
        print(f"{it:>10} {error(newton_schulz(s, it)):>14.2e} {error(last @ newton_schulz(last.T @ s, it)):>20.2e}")


if __name__ == "__main__":
    main()
