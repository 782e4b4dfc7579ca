"""Semantic calibration: parity with the authors' cases and with the loop-and-SVD reference, and its geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drtune import calibration
from drtune.calibration import (
    class_shifts,
    class_translation,
    first_converging_svd,
    procrustes_rotate,
    procrustes_rotation_matrix,
    semantic_calibrate,
)
from drtune.reference import reference_semantic_calibrate

CASES = Path(__file__).parent / "data" / "semantic_calibration_cases.npz"


def _cases() -> list[str]:
    with np.load(CASES) as z:
        return sorted({k.split("/")[0] for k in z.files})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", _cases())
def test_reproduces_reference_cases(name: str) -> None:
    with np.load(CASES) as z:
        g = {k.split("/")[1]: torch.from_numpy(np.asarray(z[k])) for k in z.files if k.startswith(name + "/")}
    scale = g["batch_down_feat"].norm(dim=1).mean()
    out = semantic_calibrate(
        g["pre_queue"], g["down_queue"], g["labels"], g["head_weight"], scale, rotate=bool(g["rotate"])
    )
    assert out.shape == g["calibrated"].shape
    assert rel_err(out, g["calibrated"]) <= 1e-4


def _banks(k: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=gen)
    labels = torch.arange(k) % c
    pre = centres[labels] + 0.7 * torch.randn(k, d, generator=gen)
    down = pre @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen) / d**0.5) + 0.5 * torch.randn(
        k, d, generator=gen
    )
    head = torch.randn(c, d, generator=gen)
    return pre, down, labels, head


@pytest.mark.parametrize("k,d,c", [(300, 40, 7), (64, 200, 5), (150, 160, 12), (40, 40, 3), (41, 40, 3)])
@pytest.mark.parametrize(
    "rotate,translate,confidence",
    [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, False)],
)
def test_matches_loop_and_svd_reference(
    k: int, d: int, c: int, rotate: bool, translate: bool, confidence: bool
) -> None:
    """Both rotation paths (K > D: D × D SVD with reflection fix; K ≤ D: thin QRs, K = D included) and every switch."""
    pre, down, labels, head = _banks(k, d, c)
    kw = dict(rotate=rotate, translate=translate, confidence=confidence)
    ours = semantic_calibrate(pre, down, labels, head, 2.5, **kw)
    ref = reference_semantic_calibrate(pre.double(), down.double(), labels, head.double(), 2.5, **kw)
    assert rel_err(ours, ref) <= 1e-4
    assert torch.allclose(ours.norm(dim=1), torch.full((k,), 2.5), atol=1e-4)


def test_reflection_fix_is_applied() -> None:
    """A downstream bank that is a mirror image of the pretrained one: det S < 0, R must stay a rotation."""
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(200, 6, generator=gen)
    mirror = torch.eye(6)
    mirror[0, 0] = -1
    down = pre @ mirror
    x = F.normalize(pre, dim=1)
    y = F.normalize(down, dim=1)
    rotated = procrustes_rotate(x, y)
    r = procrustes_rotation_matrix(x, y)
    assert torch.linalg.det(r.double()).item() == pytest.approx(1.0, abs=1e-6)
    assert rel_err(rotated, (x - x.mean(0)) @ r.T) <= 1e-5
    # a proper rotation cannot reproduce a reflection exactly
    assert rel_err(rotated, y - y.mean(0)) > 0.05


@pytest.mark.parametrize("k,d", [(60, 48), (48, 48), (44, 48)])
def test_mirrored_bank_matches_reference_on_both_paths(k: int, d: int) -> None:
    """A downstream bank that mirrors the pretrained one.

    With K > D (the full-SVD path) the centred bank has full rank D, so ``S = X_cᵀ Y_c ≈ X_cᵀ X_c · M``
    has ``det S < 0`` by construction (det M = −1, ``X_cᵀ X_c`` positive definite), and the reflection
    fix is what makes the result a rotation: deleting it breaks this case. With K ≤ D (the thin-QR
    path, which has no fix) ``S`` is singular and the reference flips a null direction of ``X_c``:
    whichever one LAPACK returns, the rotated features must still equal the reference's.
    """
    gen = torch.Generator().manual_seed(2)
    pre = torch.randn(k, d, generator=gen)
    mirror = torch.eye(d)
    mirror[0, 0] = -1
    down = pre @ mirror + 0.05 * torch.randn(k, d, generator=gen)
    x, y = F.normalize(pre, dim=1).double(), F.normalize(down, dim=1).double()
    if k > d:
        assert torch.linalg.det((x - x.mean(0)).T @ (y - y.mean(0))) < 0  # a property of S, not of an SVD
    ours = semantic_calibrate(pre, down, torch.zeros(k, dtype=torch.long), torch.randn(1, d), 1.0, translate=False)
    ref = reference_semantic_calibrate(
        pre.double(), down.double(), torch.zeros(k, dtype=torch.long), torch.randn(1, d).double(), 1.0, translate=False
    )
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("k,d", [(500, 32), (40, 64)])
def test_planted_rotation_is_recovered(k: int, d: int) -> None:
    """down = R_true · pre (centred): the rotated pretrained bank lands exactly on the downstream bank."""
    gen = torch.Generator().manual_seed(1)
    pre = F.normalize(torch.randn(k, d, generator=gen), dim=1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    down = pre @ q.T  # rows R v, norms unchanged
    rotated = procrustes_rotate(pre, down)
    assert rel_err(rotated, down - down.mean(0)) <= 1e-4
    if k > d:  # with K > D the rotation itself is unique
        r = procrustes_rotation_matrix(pre, down)
        assert torch.allclose(r, q, atol=1e-4)


def test_translation_puts_class_means_on_weighted_centres() -> None:
    pre, down, labels, head = _banks(90, 12, 4)
    down = F.normalize(down, dim=1)
    moved = class_translation(pre, down, labels, head, confidence=True)
    w_norm = F.normalize(head, dim=1)
    for c in range(4):
        m = labels == c
        weights = torch.softmax(down[m] @ w_norm[c], dim=0)
        target = (weights[:, None] * down[m]).sum(0)
        assert torch.allclose(moved[m].mean(0), target, atol=1e-5)
        # a translation: within-class offsets are unchanged
        assert torch.allclose(moved[m] - moved[m].mean(0), pre[m] - pre[m].mean(0), atol=1e-5)
    plain = class_translation(pre, down, labels, head, confidence=False)
    assert torch.allclose(plain[labels == 0].mean(0), down[labels == 0].mean(0), atol=1e-5)


def test_one_entry_and_empty_classes() -> None:
    pre, down, labels, head = _banks(30, 8, 3)
    labels = labels.clone()
    labels[7] = 4  # class 4 has exactly one entry; class 3 has none; head has 6 rows
    head = torch.cat([head, torch.randn(3, 8)])
    down_n = F.normalize(down, dim=1)
    moved = class_translation(pre, down_n, labels, head)
    assert torch.allclose(moved[7], down_n[7], atol=1e-6)  # the reference bug would not do this
    others = labels != 4
    ref = reference_semantic_calibrate(pre[others], down[others], labels[others], head, 1.0, rotate=False)
    ours = semantic_calibrate(pre, down, labels, head, 1.0, rotate=False)[others]
    assert rel_err(ours, ref) <= 1e-5  # the lone entry does not disturb the other classes
    assert torch.isfinite(ours).all()


def test_normalized_flag_skips_only_normalisation() -> None:
    pre, down, labels, head = _banks(120, 24, 5)
    a = semantic_calibrate(pre, down, labels, head, 1.7)
    b = semantic_calibrate(F.normalize(pre, dim=1), F.normalize(down, dim=1), labels, head, 1.7, normalized=True)
    assert rel_err(b, a) <= 1e-6


def test_reused_rotation_equals_fresh_rotation_on_same_bank() -> None:
    pre, down, labels, head = _banks(200, 16, 4)
    x, y = F.normalize(pre, dim=1), F.normalize(down, dim=1)
    r = procrustes_rotation_matrix(x, y)
    fresh = semantic_calibrate(x, y, labels, head, 1.0, normalized=True)
    reused = semantic_calibrate(x, y, labels, head, 1.0, normalized=True, rotation=r)
    assert rel_err(reused, fresh) <= 1e-5


def test_an_svd_driver_that_does_not_converge_hands_over_to_the_next(monkeypatch) -> None:
    """cuSOLVER's gesvda fails on banks of few images (seen on an H200); gesvd must take over.
    Drivers are CUDA-only, so the failing one is simulated and the others run the CPU's SVD."""
    real, asked = torch.linalg.svd, []

    def svd(a, driver=None):
        asked.append(driver)
        if driver == "gesvda":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1244)")
        return real(a)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(calibration, "_FAILED", set())
    s = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    u, sigma, vh = first_converging_svd(s, ("gesvda", "gesvd"))
    assert asked == ["gesvda", "gesvd"]
    assert torch.allclose((u * sigma) @ vh, s, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        first_converging_svd(s, ("gesvda",))


def test_a_driver_that_failed_on_a_shape_is_not_tried_again_on_that_shape(monkeypatch) -> None:
    """After gesvda fails on a (device, shape), the rotation's SVDs of that shape go straight to gesvd (a bank of
    few images fails it every step); another shape tries gesvda again. The CPU is given the CUDA drivers, the
    failure is simulated, and every SVD that runs is the CPU's own, so the rotations are the usual ones."""
    wide, narrow = _banks(30, 8, 3), _banks(30, 6, 3)
    expected = {8: procrustes_rotation_matrix(*wide[:2]), 6: procrustes_rotation_matrix(*narrow[:2])}
    real, asked = torch.linalg.svd, []

    def svd(a, driver=None):
        asked.append((driver, a.shape[0]))
        if driver == "gesvda":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1244)")
        return real(a)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(calibration, "_SVD_DRIVERS", {"cpu": ("gesvda", "gesvd")})
    monkeypatch.setattr(calibration, "_FAILED", set())
    for pre, down, *_ in (wide, wide, narrow, wide, narrow):
        torch.testing.assert_close(procrustes_rotation_matrix(pre, down), expected[pre.shape[1]])
    assert asked == [("gesvda", 8), ("gesvd", 8), ("gesvd", 8), ("gesvda", 6), ("gesvd", 6), ("gesvd", 8), ("gesvd", 6)]


# Each public calibration function, called on banks from _banks (K = 90 > D = 24; the thin-QR path on 20 rows).
PUBLIC_CALLS = {
    "semantic_calibrate": lambda pre, down, labels, head: semantic_calibrate(pre, down, labels, head, 1.5),
    "procrustes_rotate-thin_qr": lambda pre, down, labels, head: procrustes_rotate(pre[:20], down[:20]),
    "procrustes_rotate-full_svd": lambda pre, down, labels, head: procrustes_rotate(pre, down),
    "procrustes_rotation_matrix": lambda pre, down, labels, head: procrustes_rotation_matrix(pre, down),
    "class_shifts": lambda pre, down, labels, head: class_shifts(pre, down, labels, head),
    "class_translation": lambda pre, down, labels, head: class_translation(pre, down, labels, head),
}


@pytest.mark.parametrize("name", list(PUBLIC_CALLS))
def test_public_functions_compute_in_float32_inside_a_callers_bf16_autocast(name: str) -> None:
    """A caller's bf16 autocast (on the CPU: CUDA's dtype rules, no bf16 determinant or SVD) changes nothing."""
    banks = _banks(90, 24, 4)
    plain = PUBLIC_CALLS[name](*banks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = PUBLIC_CALLS[name](*banks)
    assert plain.dtype == autocast.dtype == torch.float32
    assert rel_err(autocast, plain) <= 1e-4
