"""Semantic calibration (SC) of the pretrained-feature bank — DR-Tune, Sec. 3.3.

The frozen pretrained encoder and the downstream encoder drift apart during fine-tuning, so
before the head is asked to classify the banked pretrained features they are moved into the
downstream feature space:

1. both banks are L2-normalised;
2. a global rotation (orthogonal Procrustes / Kabsch, Eq. 9-11) maps the centred pretrained bank
   onto the centred downstream bank: ``S = X_cᵀ Y_c = U Σ Vᵀ``, ``R = V diag(1, …, det) Uᵀ``,
   rotated rows ``R (x − x̄)``;
3. a class-level translation (Eq. 12-13) moves every pretrained feature of class ``c`` by
   ``μ_d(c) − μ_p(c)``: ``μ_p`` is the plain class mean of the (rotated) pretrained features,
   ``μ_d`` the downstream class mean weighted by ``softmax_k cos(v_d_k, W_c)`` within the class;
4. every row is rescaled to the mean L2 norm of the current batch's downstream features.

This module follows the authors' reference code (cosine confidence weights, normalised banks,
output rescale; see ``shared/spec/method.md``) but without its per-class Python loop and its
full D×D SVD:

* class statistics are segment sums (``index_add_``) — one pass over the bank for any number of
  classes, and a class with a single entry gets the exact translation; the passes run over row
  blocks that stay in cache, the confidence weights are a sampled dense-dense product, and the
  result can go into a buffer the caller reuses, so no ``K × D`` temporary is allocated;
* only the rotated *features* are needed, ``X_c Rᵀ = X_c · polar(S)``. When ``K ≤ D`` the
  centred banks span at most ``K − 1`` dimensions, so thin QRs of both banks reduce the problem
  to a ``K × K`` SVD, which gives the same rotated features (the rotation itself is not unique
  when ``S`` is rank-deficient; the rotated features are).

The calibration functions compute in float32 with autocast off, whatever the caller's autocast,
and return float32: torch has no bf16 SVD, QR or determinant, and the small singular values that
decide the rotation would not survive bf16's 8 mantissa bits.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

Fn = TypeVar("Fn", bound=Callable[..., Tensor])


def _float32(fn: Fn) -> Fn:
    """Run ``fn`` with autocast off and its floating tensor arguments in float32 (``out`` is written as given).

    A caller inside a bf16 autocast region would otherwise get bf16 matrix products and then
    ``NotImplementedError: "lu_cpu" not implemented for 'BFloat16'`` from the determinant.
    """

    @functools.wraps(fn)
    def in_float32(first: Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            args = [_as_float32(a) for a in (first, *args)]
            kwargs = {k: v if k == "out" else _as_float32(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return in_float32


def _as_float32(value):
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value


@_float32
def procrustes_rotate(pre: Tensor, down: Tensor) -> Tensor:
    """Centre both banks and rotate the pretrained rows onto the downstream rows (Kabsch).

    Returns ``X_c Rᵀ = X_c · polar(S)`` with ``R = V diag(1, …, 1, det(V Uᵀ)) Uᵀ`` for
    ``S = X_cᵀ Y_c = U Σ Vᵀ``: the reference's rotated features (a new tensor).
    The SVD is never replaced by an eigenproblem of ``SᵀS``: squaring the singular values costs
    float32 half its digits, and the small ones decide the rotation (measured at K = D = 2048:
    eigh in float32 is 1.8× faster than the SVD but 4e-2 off; in float64 it is no faster).
    """
    k, d = pre.shape
    x = pre - pre.mean(dim=0)
    y = down - down.mean(dim=0)
    if k <= d:
        # X_cᵀ = Qₓ Rₓ and Y_cᵀ = Q_y R_y (thin QR): S = Qₓ (Rₓ R_yᵀ) Q_yᵀ, so
        # X_c · polar(S) = Rₓᵀ · polar(Rₓ R_yᵀ) · Q_yᵀ — a K × K SVD instead of D × D. The centred
        # bank has rank ≤ K − 1 < D, so the reflection fix would only flip a null direction of X_c
        # and changes no rotated feature. Taken up to K = D: S has D − K + 1 zero singular values,
        # the kind of spectrum gesvda was seen failing on (see _svd); the K × K matrix has one.
        # Measured on this CPU (1 thread, float32, bench/calibration.py's banks with C = 100, median
        # of 3, one run at 2048; error of the rotated features against float64): K = 1024, D = 1280:
        # 0.60 s and 2.5e-6 here, 0.66 s and 3.8e-6 by the D × D SVD; K = D = 2048: 4.6 s and
        # 4.8e-6 here, 3.3 s and 2.7e-4 by the D × D SVD.
        _, r_x = torch.linalg.qr(x.T, mode="reduced")
        q_y, r_y = torch.linalg.qr(y.T, mode="reduced")
        u, _, vh = _svd(r_x @ r_y.T)
        return ((r_x.T @ u) @ vh) @ q_y.T
    s = x.T @ y
    u, _, vh = _svd(s)
    # Reflection fix: det(V Uᵀ) = sign det S; flip the direction of the smallest singular value.
    # Here K > D, the centred bank has full rank D in general, and det S < 0 is a real reflection
    # (a downstream bank that mirrors the pretrained one): the fix is what keeps R a rotation.
    u[:, -1] *= torch.sign(torch.linalg.det(s))
    # polar(S) first (D³) and one K × D × D product, rather than two K × D × D products.
    return x @ (u @ vh)


def _svd(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` with cuSOLVER's ``gesvda`` driver on CUDA, ``gesvd`` when that fails.

    Measured on an H200 at 2048 × 2048 (float32, error of the rotated features against float64):
    the default driver (gesvdj) 263 ms and 2.3e-4, ``gesvd`` 287 ms and 4e-6, ``gesvda`` 27 ms and
    1.3e-6. But ``gesvda`` does not converge on many repeated or zero singular values, and a bank
    of few images gives exactly that: on an H200, every DR-Tune run on Lite0 → Fashion-MNIST with
    10 to 300 labels per class raised "linalg.svd: The algorithm failed to converge" (bench/datascale.py).
    ``gesvd`` (QR iteration) always converges, so it takes over when ``gesvda`` reports failure.
    The CPU has one LAPACK path and no choice to make.
    """
    drivers = _SVD_DRIVERS.get(s.device.type)
    return first_converging_svd(s, drivers) if drivers else torch.linalg.svd(s)


# The drivers _svd tries, in order, per device type; a type not listed takes torch's only path.
_SVD_DRIVERS = {"cuda": ("gesvda", "gesvd")}


# (driver, device, shape) of every SVD that failed to converge in this process: first_converging_svd
# does not try that driver on that shape again.
_FAILED: set[tuple[str, str, tuple[int, ...]]] = set()


def first_converging_svd(s: Tensor, drivers: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD by the first of ``drivers`` that converges (the last one's error propagates).

    A driver that failed once on a (device, shape) is skipped for that shape from then on: a bank
    of few distinct images keeps its repeated and zero singular values for the whole run, so a
    failed ``gesvda`` would fail again every step and cost its own time before ``gesvd`` runs.
    """
    where = (str(s.device), tuple(s.shape))
    for driver in drivers[:-1]:
        if (driver, *where) in _FAILED:
            continue
        try:
            return torch.linalg.svd(s, driver=driver)
        except torch.linalg.LinAlgError:
            _FAILED.add((driver, *where))
    return torch.linalg.svd(s, driver=drivers[-1])


@_float32
def procrustes_rotation_matrix(pre: Tensor, down: Tensor) -> Tensor:
    """The full ``D × D`` Kabsch rotation ``R`` (reference formula, via SVD), for reuse.

    Used when a rotation computed every ``rotation_every`` steps is applied to the banks of the
    steps in between: there the new rows may leave the subspace the old bank spanned, so the
    rotation must be a complete orthogonal matrix, which only the full decomposition gives.
    Computed in float64, returned in float32.
    """
    pre, down = pre.double(), down.double()
    s = (pre - pre.mean(dim=0)).T @ (down - down.mean(dim=0))
    u, _, vh = _svd(s)
    v = vh.T
    fix = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
    fix[-1] = torch.sign(torch.linalg.det(v @ u.T))
    return ((v * fix) @ u.T).float()


@_float32
def class_shifts(pre: Tensor, down: Tensor, labels: Tensor, head_weight: Tensor, *, confidence: bool = True) -> Tensor:
    """``μ_d(c) − μ_p(c)`` for every class (Eq. 12-13): a ``C × D`` table, one pass over the banks.

    ``μ_p(c)`` is the plain mean of class ``c``'s pretrained rows, ``μ_d(c)`` the mean of its
    downstream rows (L2-normalised) weighted by ``softmax_k cos(v_d_k, W_c)`` within the class.
    Class sums are segment sums (``index_add_``) over row blocks that stay in cache, so no
    ``K × D`` temporary is ever allocated. A class absent from ``labels`` gets a zero shift.
    """
    num_classes, dim = head_weight.shape
    count = torch.bincount(labels, minlength=num_classes).to(pre.dtype)
    sum_pre, sum_down = torch.zeros(2, num_classes, dim, dtype=pre.dtype, device=pre.device)
    weight = torch.ones_like(labels, dtype=pre.dtype)
    w_hat = F.normalize(head_weight.to(pre.dtype), dim=1)
    for rows in _blocks(pre):
        lab, dn = labels[rows], down[rows]
        sum_pre.index_add_(0, lab, pre[rows])
        if confidence:
            # cos(v_d, W_c) ∈ [-1, 1], so exp() cannot overflow and the usual max-subtraction of
            # a softmax is unnecessary.
            weight[rows] = torch.exp(_row_dots(dn, w_hat, lab))
            dn = dn * weight[rows].unsqueeze(1)
        sum_down.index_add_(0, lab, dn)
    mass = torch.zeros_like(count).index_add_(0, labels, weight) if confidence else count
    # μ_d − μ_p, in place on the C × D sums (at C = 397 each table is 3 MiB)
    mu_down = sum_down.mul_(mass.clamp(min=torch.finfo(pre.dtype).tiny).reciprocal().unsqueeze(1))
    return mu_down.sub_(sum_pre.mul_(count.clamp(min=1).reciprocal().unsqueeze(1)))


def _row_dots(rows: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """``rows[k] · table[index[k]]`` for every ``k``, without gathering a ``K × D`` copy of ``table``.

    A sampled dense-dense product (SDDMM) on a ``K × C`` pattern with one entry per row: 5×
    faster than gather + row-wise dot at K = D = 2048 on CPU. On a GPU the gather is cheap and
    used instead.
    """
    if rows.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            crow = torch.arange(rows.shape[0] + 1, device=rows.device)
            pattern = torch.sparse_csr_tensor(
                crow, index, torch.zeros_like(rows[:, 0]), size=(rows.shape[0], table.shape[0])
            )
            return torch.sparse.sampled_addmm(pattern, rows, table.T).values()
    return torch.linalg.vecdot(rows, table.index_select(0, index))


@_float32
def class_translation(
    pre: Tensor, down: Tensor, labels: Tensor, head_weight: Tensor, *, confidence: bool = True
) -> Tensor:
    """Move each class's pretrained rows by ``μ_d(c) − μ_p(c)`` (Eq. 12-13), for all classes at once.

    ``down`` rows must be L2-normalised. Classes absent from ``labels`` are untouched (nothing
    indexes them); a class with one entry moves exactly onto its downstream feature.
    """
    return pre + class_shifts(pre, down, labels, head_weight, confidence=confidence).index_select(0, labels)


def _shift_and_rescale(
    rows: Tensor, shift: Tensor | None, labels: Tensor, scale: float | Tensor, out: Tensor
) -> Tensor:
    """``out = scale · normalize(rows + shift[labels])``, block by block (``out`` may be ``rows``)."""
    for block in _blocks(rows):
        o = out[block]
        if shift is None:
            o.copy_(rows[block])
        else:
            torch.add(rows[block], shift.index_select(0, labels[block]), out=o)
        o.mul_(scale / torch.linalg.vector_norm(o, dim=1, keepdim=True).clamp(min=1e-12))
    return out


# Rows per block: blocks of about 2²⁰ floats (4 MiB) keep a bank pass's temporaries in cache.
# Measured on a 2-core CPU: as fast as one whole-bank pass at K = 2048 and 2-3× faster at
# K = 8192, where whole-bank temporaries exceed the cache and glibc's mmap threshold.
_BLOCK_ELEMENTS = 1 << 20


def _blocks(rows: Tensor) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // rows.shape[1])
    return [slice(i, i + step) for i in range(0, rows.shape[0], step)]


@torch.no_grad()
@_float32
def semantic_calibrate(
    pre_bank: Tensor,
    down_bank: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    scale: float | Tensor,
    *,
    rotate: bool = True,
    translate: bool = True,
    confidence: bool = True,
    normalized: bool = False,
    rotation: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Calibrated pretrained features ``v̂`` (K × D) for the DR term, as in the reference code.

    Args:
        pre_bank: K × D pretrained features.
        down_bank: K × D downstream features of the same images.
        labels: K class indices in ``[0, C)``.
        head_weight: C × D weight of the linear head (confidence weights use its rows).
        scale: target L2 norm of every output row: the mean norm of the batch's downstream features.
        rotate: apply the global Procrustes rotation (computed from these banks).
        translate: apply the class-level translation.
        confidence: weight the downstream class centre by ``softmax(cos(v_d, W_c))``; else a plain mean.
        normalized: the banks' rows already have unit norm (a :class:`FeatureBank` keeps them so);
            skips two K × D normalisations.
        rotation: a precomputed D × D rotation ``R`` to apply instead of computing one (used to
            reuse the last rotation between recomputations). Ignored when ``rotate`` is False.
        out: a float32 K × D tensor to write the result into (a training loop reuses one every step:
            a fresh K × D result costs a page fault per 4 KiB on first write, 16 ms at
            K = 8192, D = 2048 on a 2-core CPU). It must not alias the banks.
    """
    if not normalized:
        pre_bank = F.normalize(pre_bank, dim=1)
        down_bank = F.normalize(down_bank, dim=1)
    if rotate:
        if rotation is None:
            pre_bank = procrustes_rotate(pre_bank, down_bank)
        else:
            pre_bank = (pre_bank - pre_bank.mean(dim=0)) @ rotation.T
    shift = class_shifts(pre_bank, down_bank, labels, head_weight, confidence=confidence) if translate else None
    if out is None:
        # A rotated bank is this function's own temporary, so it is rescaled in place.
        out = pre_bank if rotate else torch.empty_like(pre_bank)
    return _shift_and_rescale(pre_bank, shift, labels, scale, out)
