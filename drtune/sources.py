"""Dataset sources that work offline, and the seeded, stratified few-label splits.

* ``digits`` — scikit-learn's bundled 8 × 8 digits (1,797 images): the fast source for tests.
  It has no official test split, so a stratified quarter (seeded) is held out as test.
* ``fashion-mnist`` — the standard idx files, looked up in ``<root>/fashion-mnist/`` and in
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drtune.data import ArraySplit

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SYSTEM_DATASETS = Path("/usr/share/datasets")


@dataclass
class RawDataset:
    """A source's official train and test splits and its class names."""

    train: ArraySplit
    test: ArraySplit
    classes: list[str]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def fashion_mnist_dir(root: str | Path) -> Path:
    """The first directory holding all four Fashion-MNIST files, or a FileNotFoundError saying where to put them."""
    candidates = [Path(root) / "fashion-mnist", SYSTEM_DATASETS / "fashion-mnist"]
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST not found offline: put " + ", ".join(FASHION_MNIST_FILES)
        + f" in {candidates[0]} (or install Debian's dataset-fashion-mnist, which puts them in {candidates[1]})"
    )


def load_fashion_mnist(root: str | Path) -> RawDataset:
    folder = fashion_mnist_dir(root)
    arrays = [_read_idx(folder / name) for name in FASHION_MNIST_FILES]
    return RawDataset(
        train=ArraySplit(arrays[0][..., None], arrays[1].astype(np.int64)),
        test=ArraySplit(arrays[2][..., None], arrays[3].astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
    )


def load_digits_dataset(seed: int = 0) -> RawDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    test_idx = stratified_take(labels, fraction=0.25, seed=seed)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return RawDataset(
        train=ArraySplit(images[train_mask], labels[train_mask]),
        test=ArraySplit(images[test_idx], labels[test_idx]),
        classes=[str(d) for d in range(10)],
    )


def stratified_take(labels: np.ndarray, *, fraction: float | None = None, per_class: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded per-class sample: ``per_class`` images or ``round(fraction · n_c)``.

    The permutation of each class depends only on (seed, class), so the same seed gives the same
    sample on any machine and for any other class's size.
    """
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        take = per_class if per_class is not None else int(round(fraction * len(idx)))
        chosen.append(rng.permutation(idx)[: min(take, len(idx))])
    return np.sort(np.concatenate(chosen))


def load_source(dataset: str, root: str | Path = "data/raw", seed: int = 0) -> RawDataset:
    """Load a dataset by name (``digits`` or ``fashion-mnist``)."""
    if dataset == "digits":
        return load_digits_dataset(seed)
    if dataset == "fashion-mnist":
        return load_fashion_mnist(root)
    raise ValueError(f"data.dataset = {dataset!r}: unknown; known: digits, fashion-mnist")


def few_label_splits(raw: RawDataset, *, labels_per_class: int | None, label_fraction: float | None,
                     val_fraction: float, seed: int) -> tuple[ArraySplit, ArraySplit, ArraySplit]:
    """(train, val, test): the labelled budget is sampled per class from the official training
    split, validation is a stratified share of that budget, the official test split is untouched."""
    labels = raw.train.labels
    if labels_per_class is None and label_fraction is None:
        kept = np.arange(len(labels))
    else:
        kept = stratified_take(labels, fraction=label_fraction, per_class=labels_per_class, seed=seed)
    val_local = stratified_take(labels[kept], fraction=val_fraction, seed=seed + 1)
    val_idx = kept[val_local]
    train_idx = np.setdiff1d(kept, val_idx)
    pick = lambda idx: ArraySplit(raw.train.images[idx], raw.train.labels[idx])  # noqa: E731
    return pick(train_idx), pick(val_idx), raw.test
