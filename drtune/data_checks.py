"""Duplicates and leakage between the prepared splits, found before anything trains on them.

A test image that is also a training or validation image measures memory, not generalisation;
two copies of one image with different labels are label noise a model cannot fit. ``prepare``
looks for both, within and across train / val / test (and it measures class imbalance, which calls
for another ``tune.metric``):

* **exact duplicates**: equal stored pixels (:func:`drtune.sources.image_hash`);
* **near-duplicates**: two 32 × 32 grey thumbnails whose Pearson correlation reaches
  :data:`NEAR_CORRELATION`, from a search over all pairs (one chunked matrix product: 3 s for
  Fashion-MNIST's 10,600 labelled images on 2 CPU cores). A 64-bit perceptual hash (pHash) was
  tried first and dropped: on smooth images its low-frequency coefficients sit near their median
  and flip, so a JPEG re-encoding (quality 90, 10 levels brighter) of a 48 px image moved 4 to 12
  of its 64 bits at a thumbnail correlation of 0.9996, and any usable radius let through hundreds
  of different Fashion-MNIST garments. Shifted, cropped or mirrored copies are not found.

``bench/near_duplicates.py`` prints how the threshold splits real pairs from re-encoded copies.

The report (:func:`check_splits`) goes into ``stats.json: checks``: pair counts per split pair and
kind, pairs with different labels, the test images that leak, and example pairs named by file
(or by row of the prepared split when the source has no files). Test images that are exact copies
of training or validation images (and near copies too with ``data.near_copies_leak``) above
``data.max_leakage`` (a share of the test split) stop ``prepare`` with :class:`LeakageError`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from PIL import Image
from tqdm import tqdm

from drtune.data import ArraySplit
from drtune.sources import image_hash

# Thumbnail correlation from which two images are near copies. On Fashion-MNIST at 60 labels per
# class the closest different garments reach 0.99 (31 pairs), one pair of trousers across train and
# test 0.998; a JPEG re-encoding or a brightness shift of a photo keeps its copy above 0.999.
NEAR_CORRELATION = 0.995
EXAMPLES = 10  # example pairs kept per split pair in stats.json
IMBALANCE = 3.0  # largest over smallest labelled class above which prepare suggests another tune.metric
_SIDE = 32  # thumbnail side
_CHUNK = 2048  # thumbnails correlated with all others at once (2048 × N float32)


def grey_thumbnails(images: np.ndarray) -> np.ndarray:
    """N × 1024 float32 rows: 32 × 32 grey versions of uint8 N × H × W × C images (Lanczos), each
    centred and scaled to unit norm, so a dot product of two rows is their Pearson correlation."""
    resample = Image.Resampling.LANCZOS
    rows = np.empty((len(images), _SIDE * _SIDE), np.float32)
    for i, image in enumerate(images):  # one image at a time: no float copy of the whole split
        grey = Image.fromarray(image[..., 0]) if image.shape[2] == 1 else Image.fromarray(image).convert("L")
        rows[i] = np.asarray(grey.resize((_SIDE, _SIDE), resample), np.float32).ravel()
    rows -= rows.mean(axis=1, keepdims=True)
    # a flat image has no pattern to correlate: its zero row never reaches the threshold
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


@dataclass(frozen=True)
class DuplicatePair:
    """Two images that are copies: positions in the concatenated splits, ``exact`` or ``near``."""

    first: int
    second: int
    kind: str


def find_duplicates(images: np.ndarray) -> list[DuplicatePair]:
    """Every exact and near-duplicate pair among ``images`` (``first < second``).

    Exact copies are grouped by content and each is paired with the group's first image (a group of
    ``m`` copies gives ``m − 1`` pairs); near-duplicates are all other pairs whose thumbnails
    correlate at :data:`NEAR_CORRELATION` or more.
    """
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image_hash(image)].append(i)
    pairs = [DuplicatePair(g[0], j, "exact") for g in groups.values() for j in g[1:]]
    group = np.empty(len(images), np.int64)
    for k, members in enumerate(groups.values()):
        group[members] = k
    thumbs = grey_thumbnails(images)
    starts = range(0, len(thumbs), _CHUNK)
    for start in tqdm(starts, desc="near-duplicates", disable=len(starts) < 10, leave=False):
        correlation = thumbs[start : start + _CHUNK] @ thumbs[start:].T  # pairs i < j only: the upper part
        for a, b in np.argwhere(correlation >= NEAR_CORRELATION):
            i, j = start + int(a), start + int(b)
            if i < j and group[i] != group[j]:
                pairs.append(DuplicatePair(i, j, "near"))
    return pairs


class LeakageError(ValueError):
    """Test images duplicate training or validation images beyond ``data.max_leakage``; names them."""


def check_splits(
    splits: dict[str, ArraySplit], classes: list[str], max_leakage: float, near_copies_leak: bool = False
) -> dict:
    """Find duplicates within and across ``splits`` (train, val, test) and report them (``stats.json: checks``).

    Raises :class:`LeakageError` naming the files when the test images with an exact copy in train or
    val (or a near one, with ``near_copies_leak``) exceed ``max_leakage`` of the test split; near
    copies that do not count are named in a warning. Train/val copies and copies with different labels are
    reported as ``warnings`` (a stage prints them) and stop nothing.
    """
    names = list(splits)
    offsets = np.cumsum([0, *(len(s) for s in splits.values())])
    images = np.concatenate([s.images for s in splits.values()])
    labels = np.concatenate([s.labels for s in splits.values()])

    def where(i: int) -> tuple[str, int]:
        k = int(np.searchsorted(offsets, i, side="right")) - 1
        return names[k], i - int(offsets[k])

    def named(i: int) -> str:
        split, row = where(i)
        files = splits[split].names
        return files[row] if files is not None else f"{split} #{row}"

    pairs = find_duplicates(images)
    counts = {f"{a}~{b}": {"exact": 0, "near": 0} for a, b in [*combinations(names, 2), *((n, n) for n in names)]}
    examples: dict[str, list] = defaultdict(list)
    conflicting, leaked, near_only = [], {}, {}
    for pair in pairs:
        (sa, _), (sb, _) = where(pair.first), where(pair.second)
        key = f"{sa}~{sb}" if f"{sa}~{sb}" in counts else f"{sb}~{sa}"
        counts[key][pair.kind] += 1
        entry = {
            "kind": pair.kind,
            "files": [named(pair.first), named(pair.second)],
            "labels": [classes[labels[pair.first]], classes[labels[pair.second]]],
        }
        if len(examples[key]) < EXAMPLES:
            examples[key].append(entry)
        if labels[pair.first] != labels[pair.second]:
            conflicting.append(entry)
        if (sa == "test") != (sb == "test"):
            test_side, other = (pair.first, pair.second) if sa == "test" else (pair.second, pair.first)
            counted = leaked if pair.kind == "exact" or near_copies_leak else near_only
            counted.setdefault(test_side, named(other))
    n_test = len(splits["test"])
    fraction = len(leaked) / max(n_test, 1)
    if fraction > max_leakage:
        listed = [f"  {named(t)} = {other}" for t, other in sorted(leaked.items())]
        shown = listed[:50] + ([f"  … ({len(listed)} in all)"] if len(listed) > 50 else [])
        raise LeakageError(
            f"{len(leaked)} of {n_test} test images ({fraction:.2%}) are {'exact or near' if near_copies_leak else 'exact'} "
            "copies of training or validation images, "
            f"above data.max_leakage = {max_leakage:g}:\n" + "\n".join(shown) + "\nremove them from the test split, "
            f"or accept them with data.max_leakage ≥ {math.ceil(fraction * 1e4) / 1e4:.4f}"
        )
    warnings = []
    labelled = np.bincount(np.concatenate([splits["train"].labels, splits["val"].labels]), minlength=len(classes))
    ratio = float(labelled.max() / max(labelled.min(), 1))
    if ratio > IMBALANCE:
        big, small = int(labelled.argmax()), int(labelled.argmin())
        warnings.append(
            f"the classes are imbalanced: {classes[big]} has {labelled[big]} labelled images, {classes[small]} "
            f"{labelled[small]} ({ratio:.1f}×); top-1 then rewards the large classes: consider tune.metric: "
            "macro_f1 (or balanced_accuracy)"
        )
    near_only = {t: other for t, other in near_only.items() if t not in leaked}
    if near_only:
        first = min(near_only)
        warnings.append(
            f"{len(near_only)} test images are near copies of training or validation images (not counted as "
            f"leakage; data.near_copies_leak: true counts them), e.g. {named(first)} ≈ {near_only[first]}"
        )
    train_val = counts["train~val"]["exact"] + counts["train~val"]["near"]
    if train_val:
        warnings.append(f"{train_val} validation images are copies of training images: validation overrates them")
    if conflicting:
        warnings.append(
            f"{len(conflicting)} pairs of copies have different labels, e.g. {' and '.join(conflicting[0]['files'])}"
        )
    return {
        "near_duplicate": {"thumbnail_correlation": NEAR_CORRELATION, "counted_as_leakage": near_copies_leak},
        "pairs": counts,
        "class_imbalance": ratio,  # largest labelled class over the smallest (train + validation)
        "conflicting_labels": len(conflicting),
        "conflicting_examples": conflicting[:EXAMPLES],
        "test_leakage": {"images": len(leaked), "fraction": fraction, "max": max_leakage, "near_only": len(near_only)},
        "examples": dict(examples),
        "warnings": warnings,
    }
