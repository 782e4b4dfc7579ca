"""Dataset sources that work offline, and the seeded, stratified few-label splits.

* ``digits`` — scikit-learn's bundled 8 × 8 digits (1,797 images): the fast source for tests.
  It has no official test split, so a stratified quarter (seeded) is held out as test.
* ``fashion-mnist`` — the standard idx files, looked up in ``<root>/fashion-mnist/`` and in
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``).
* ``imagefolder:<path>`` — one folder per class (jpg, png, webp, bmp; any mode becomes RGB;
  files in nested sub-folders belong to their top-level class). With ``train/`` and ``test/``
  sub-folders those are the splits; otherwise a stratified, seeded fifth is held out as test.
* the paper's benchmarks by name (``cifar10``, ``dtd``, …) through torchvision: see
  :mod:`drtune.named_datasets`.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from drtune.config import DataConfig
from drtune.data import ArraySplit
from drtune.named_datasets import NAMED_DATASETS, load_named, square_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

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
    skipped_bad: int = 0  # unreadable files skipped (data.skip_bad)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def fashion_mnist_dir(root: str | Path, download: bool = False) -> Path:
    """The first directory holding all four Fashion-MNIST files; downloads them into
    ``<root>/fashion-mnist`` when allowed (checksums verified), else a FileNotFoundError saying
    where to put them."""
    candidates = [Path(root) / "fashion-mnist", SYSTEM_DATASETS / "fashion-mnist"]
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES):
            return folder
    where = (", ".join(FASHION_MNIST_FILES) + f" in {candidates[0]} (or install Debian's dataset-fashion-mnist, "
             f"which puts them in {candidates[1]})")
    if not download:
        raise FileNotFoundError(f"Fashion-MNIST not found and data.download is off: put {where}")
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    try:
        for name, md5 in FashionMNIST.resources:
            if not (candidates[0] / name).is_file():
                download_url(FashionMNIST.mirrors[0] + name, candidates[0], name, md5)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(f"Fashion-MNIST not found offline and the download failed ({err}): put {where}") from None
    return candidates[0]


def load_fashion_mnist(root: str | Path, download: bool = False) -> RawDataset:
    folder = fashion_mnist_dir(root, download)
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


class BadImagesError(ValueError):
    """Some image files cannot be decoded; the message lists them."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        shown = "\n  ".join(str(p) for p in paths[:20]) + (f"\n  … ({len(paths)} in all)" if len(paths) > 20 else "")
        super().__init__(f"{len(paths)} unreadable image file(s) (set data.skip_bad: true to skip them):\n  {shown}")


def _read_image(path: Path, size: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to ``size`` and centre-crop to ``size`` × ``size``."""
    with Image.open(path) as img:
        img.load()
        return square_rgb(img, size)


def _scan_classes(folder: Path) -> list[tuple[str, list[Path]]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    out = []
    for d in classes:
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        out.append((d.name, files))
    if len(out) < 2:
        raise ValueError(f"{folder} has {len(out)} class folder(s); image classification needs at least two")
    return out


def _read_folder(scanned: list[tuple[str, list[Path]]], classes: list[str], size: int, skip_bad: bool,
                 bad: list[Path]) -> ArraySplit:
    images, labels = [], []
    total = sum(len(files) for _, files in scanned)
    with tqdm(total=total, desc="reading images", disable=total < 500, leave=False) as bar:
        for name, files in scanned:
            label = classes.index(name)
            for f in files:
                try:
                    images.append(_read_image(f, size))
                    labels.append(label)
                except (OSError, ValueError, Image.DecompressionBombError):
                    bad.append(f)
                bar.update()
    if bad and not skip_bad:
        raise BadImagesError(bad)
    return ArraySplit(np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
                      np.asarray(labels, dtype=np.int64))


def load_image_folder(folder: str | Path, size: int = 96, skip_bad: bool = False, seed: int = 0) -> RawDataset:
    """A dataset from a folder of class folders; see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    bad: list[Path] = []
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_scan, test_scan = _scan_classes(folder / "train"), _scan_classes(folder / "test")
        classes = [name for name, _ in train_scan]
        missing = sorted(set(classes) - {name for name, _ in test_scan})
        if missing:
            raise ValueError(f"{folder / 'test'} has no folder for class(es) {', '.join(missing)}")
        train = _read_folder(train_scan, classes, size, skip_bad, bad)
        test = _read_folder(test_scan, classes, size, skip_bad, bad)
    else:
        scan = _scan_classes(folder)
        classes = [name for name, _ in scan]
        train, test = _hold_out_test(_read_folder(scan, classes, size, skip_bad, bad), seed)
    return RawDataset(train, test, classes, skipped_bad=len(bad))


KNOWN_DATASETS = ("digits", "fashion-mnist", "imagefolder:<path>", *NAMED_DATASETS)


def _hold_out_test(train: ArraySplit, seed: int) -> tuple[ArraySplit, ArraySplit]:
    test_idx = stratified_take(train.labels, fraction=0.2, seed=seed)
    keep = np.setdiff1d(np.arange(len(train)), test_idx)
    return ArraySplit(train.images[keep], train.labels[keep]), ArraySplit(train.images[test_idx], train.labels[test_idx])


def load_source(dataset: str, root: str | Path = "data/raw", seed: int = 0, *, image_size: int = 96,
                skip_bad: bool = False, download: bool = False) -> RawDataset:
    """Load a dataset by name; see the module docstring for the names."""
    if dataset == "digits":
        return load_digits_dataset(seed)
    if dataset == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if dataset.startswith("imagefolder:"):
        return load_image_folder(dataset.split(":", 1)[1], image_size, skip_bad, seed)
    if dataset in NAMED_DATASETS:
        train, test, classes = load_named(dataset, root, size=image_size, download=download)
        if test is None:
            train, test = _hold_out_test(train, seed)
        return RawDataset(train, test, classes)
    raise ValueError(f"data.dataset = {dataset!r}: unknown; known: {', '.join(KNOWN_DATASETS)}")


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
    pick = lambda idx: ArraySplit(raw.train.images[idx], raw.train.labels[idx])
    splits = pick(train_idx), pick(val_idx), raw.test
    for split_name, split in zip(("train", "validation", "test"), splits, strict=True):
        counts = np.bincount(split.labels, minlength=len(raw.classes))
        empty = [raw.classes[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(
                f"class(es) {', '.join(empty)} have no {split_name} images after splitting; raise "
                "data.labels_per_class / data.label_fraction or data.val_fraction, or add images"
            )
    return splits


def load_splits(cfg: DataConfig) -> tuple[RawDataset, tuple[ArraySplit, ArraySplit, ArraySplit]]:
    """The source named by ``data.*`` and its (train, val, test) splits: what ``prepare`` writes."""
    raw = load_source(cfg.dataset, cfg.root, cfg.seed, image_size=cfg.store_size, skip_bad=cfg.skip_bad,
                      download=cfg.download)
    return raw, few_label_splits(raw, labels_per_class=cfg.labels_per_class, label_fraction=cfg.label_fraction,
                                 val_fraction=cfg.val_fraction, seed=cfg.seed)
