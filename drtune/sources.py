"""Dataset sources that work offline, and the seeded, stratified few-label splits.

* ``digits`` — scikit-learn's bundled 8 × 8 digits (1,797 images): the fast source for tests.
  It has no official test split, so a stratified quarter (seeded) is held out as test.
* ``fashion-mnist`` — the standard idx files, looked up in ``<root>/fashion-mnist/`` and in
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``).
* ``imagefolder:<path>`` — one folder per class, found and filtered as
  ``torchvision.datasets.ImageFolder`` does (every sub-folder is a class, sorted by name; files with
  torchvision's image extensions; any mode becomes RGB; files in nested sub-folders belong to their
  top-level class). Layouts: ``train/`` + ``test/`` are the splits (a ``val/`` beside them is left
  out: validation is drawn from ``train/``); ``train/`` + ``val/`` use ``val/`` as the test split;
  otherwise a stratified, seeded fifth is held out as test. Every problem is reported in one run
  (empty class folders and unreadable files together); files that are not images are listed as
  ignored, and skipped unreadable files (``data.skip_bad``) are listed too. Under a label budget
  only the labelled training images and the test images are decoded (the rest only when
  ``data.unlabelled: rest`` asks for it).
* ``csv:<file>`` — a table of image paths and labels (columns ``path``, ``label``, optionally
  ``split``; :func:`load_image_table`), read like an image folder once every row checks out.
* the paper's benchmarks by name (``cifar10``, ``dtd``, …) through torchvision: see
  :mod:`drtune.named_datasets`.

The unlabelled split (``data.unlabelled``, :func:`load_unlabelled_split`): ``rest`` is the training
images beyond the label budget, labels dropped; a folder is every file with torchvision's image
extensions at any depth, read like an image folder's (shorter side resized, centre crop) at the
labelled images' size and channel count (RGB → L for the 1-channel sets: luma, as PIL converts).
``data.unlabelled_max`` draws a seeded sample of the candidates, read one by one until it is full,
so it bounds memory and reading; only the files drawn are read. An image whose stored bytes equal
a validation, test or labelled training image's, or an earlier unlabelled one's, is dropped and
counted. Unreadable files are reported or skipped as for labelled folders.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from tqdm import tqdm

from drtune.config import DataConfig
from drtune.data import ArraySplit
from drtune.named_datasets import NAMED_DATASETS, load_named, square_rgb

IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS)  # torchvision's: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SYSTEM_DATASETS = Path("/usr/share/datasets")


@dataclass
class RawDataset:
    """A source's official train and test splits and its class names."""

    train: ArraySplit
    test: ArraySplit
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped (data.skip_bad)
    ignored: list[str] = field(default_factory=list)  # files that are not images, folders not read
    labelled: bool = False  # train is already the labelled subset (an image folder read under a budget)
    rest_files: list[Path] | None = None  # under a budget: the image folder's training files left out, not read


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def fashion_mnist_dir(root: str | Path, download: bool = False) -> Path:
    """The first directory holding all four Fashion-MNIST files; downloads them into
    ``<root>/fashion-mnist`` when allowed (checksums verified), else a FileNotFoundError saying
    where to put them."""
    candidates = [Path(root) / "fashion-mnist", SYSTEM_DATASETS / "fashion-mnist"]
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES):
            return folder
    where = (
        ", ".join(FASHION_MNIST_FILES) + f" in {candidates[0]} (or install Debian's dataset-fashion-mnist, "
        f"which puts them in {candidates[1]})"
    )
    if not download:
        raise FileNotFoundError(f"Fashion-MNIST not found and data.download is off: put {where}")
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    try:
        for name, md5 in FashionMNIST.resources:
            if not (candidates[0] / name).is_file():
                download_url(FashionMNIST.mirrors[0] + name, candidates[0], name, md5)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"Fashion-MNIST not found offline and the download failed ({err}): put {where}"
        ) from None
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


def stratified_take(
    labels: np.ndarray, *, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> np.ndarray:
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


def held_out_fifth(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a seeded, stratified fifth held out as test, for a source without a test
    split (an image folder or table without one, a named dataset without one)."""
    test_idx = stratified_take(labels, fraction=0.2, seed=seed)
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


class BadImagesError(ValueError):
    """An image folder has problems: empty class folders and/or unreadable files; the message lists all of them."""

    def __init__(self, folder: Path, empty: list[Path], unreadable: list[Path]) -> None:
        self.empty, self.unreadable = empty, unreadable
        lines = [f"class folder {d} holds no images ({' '.join(IMAGE_EXTENSIONS)})" for d in empty]
        lines += [f"unreadable image: {p}" for p in unreadable[:50]]
        if len(unreadable) > 50:
            lines.append(f"… ({len(unreadable)} unreadable files in all)")
        hint = " (data.skip_bad: true skips unreadable files)" if unreadable else ""
        super().__init__(f"{folder}: {len(empty) + len(unreadable)} problem(s){hint}:\n  " + "\n  ".join(lines))


def _read_image(path: Path, size: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to ``size`` and centre-crop to ``size`` × ``size``."""
    with Image.open(path) as img:
        img.load()
        return square_rgb(img, size)


def _not_utf8(name: str) -> bool:
    """Whether a file name holds bytes that are not UTF-8 (Python decodes them to lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _scan_classes(folder: Path, empty: list[Path], ignored: list[str]) -> list[tuple[str, list[Path]]]:
    """Class folders as torchvision finds them, with their image files; empty classes and
    non-image files are collected, not raised, so one run reports them all."""
    try:
        names, _ = find_classes(str(folder))
    except FileNotFoundError:
        names = []
    if len(names) < 2:
        raise ValueError(f"{folder} has {len(names)} class folder(s); image classification needs at least two")
    unusable = [n for n in names if _not_utf8(n) or not n.isprintable()]
    if unusable:  # a class name becomes a label in MLflow, JSON and CSV: printable UTF-8 text
        shown = ", ".join(ascii(n) for n in unusable)
        raise ValueError(f"{folder}: class folder names must be printable UTF-8 text; rename {shown}")
    ignored += [str(f) for f in sorted(folder.iterdir()) if f.is_file()]
    out = []
    for name in names:
        files = []
        for f in sorted((folder / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
            elif f.is_file():
                ignored.append(str(f))
        if not files:
            empty.append(folder / name)
        out.append((name, files))
    return out


def _listing(scanned: list[tuple[str, list[Path]]], classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """(files, labels) of a scan, in class order: labels without decoding a single image."""
    files = [f for _, fs in scanned for f in fs]
    labels = np.asarray([classes.index(name) for name, fs in scanned for _ in fs], dtype=np.int64)
    return files, labels


def _read_files(files: list[Path], labels: np.ndarray, size: int, bad: list[Path], base: Path) -> ArraySplit:
    """Decode ``files`` (unreadable ones go to ``bad``); names are paths relative to ``base``."""
    images, kept = [], []
    for i, f in enumerate(tqdm(files, desc="reading images", disable=len(files) < 500, leave=False)):
        try:
            images.append(_read_image(f, size))
            kept.append(i)
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(f)
    return ArraySplit(
        np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        labels[kept],
        [os.path.relpath(files[i], base) for i in kept],
    )


def load_image_folder(
    folder: str | Path,
    size: int = 96,
    skip_bad: bool = False,
    seed: int = 0,
    budget: tuple[int | None, float | None] | None = None,
) -> RawDataset:
    """A dataset from a folder of class folders; see the module docstring.

    With ``budget`` = (``labels_per_class``, ``label_fraction``) only the training images of the
    labelled subset (:func:`stratified_take` on the file list's labels) and the test images are
    decoded, and the result is marked ``labelled``: the same splits as decoding every file, read
    from a fraction of the disk. A skipped unreadable file (``skip_bad``) then leaves its class
    one image short instead of being replaced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    empty: list[Path] = []
    ignored: list[str] = []
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train_scan, test_scan = _scan_classes(folder / "train", empty, ignored), _scan_classes(test_dir, empty, ignored)
        if test_dir.name == "test" and (folder / "val").is_dir():
            ignored.append(f"{folder / 'val'}/ (validation is drawn from train/)")
        classes = [name for name, _ in train_scan]
        missing = sorted(set(classes) - {name for name, _ in test_scan})
        if missing:
            raise ValueError(f"{test_dir} has no folder for class(es) {', '.join(missing)}")
        train_files, train_labels = _listing(train_scan, classes)
        test_files, test_labels = _listing(test_scan, classes)
    else:
        scan = _scan_classes(folder, empty, ignored)
        classes = [name for name, _ in scan]
        files, labels = _listing(scan, classes)
        train_idx, test_idx = held_out_fifth(labels, seed)
        train_files, train_labels = [files[i] for i in train_idx], labels[train_idx]
        test_files, test_labels = [files[i] for i in test_idx], labels[test_idx]
    return _read_listing(
        folder,
        classes,
        (train_files, train_labels),
        (test_files, test_labels),
        size,
        skip_bad,
        seed,
        budget,
        empty,
        ignored,
    )


def _read_listing(
    source: Path,
    classes: list[str],
    train: tuple[list[Path], np.ndarray],
    test: tuple[list[Path], np.ndarray],
    size: int,
    skip_bad: bool,
    seed: int,
    budget: tuple[int | None, float | None] | None,
    empty: list[Path],
    ignored: list[str],
) -> RawDataset:
    """Decode a listed dataset (files and labels of both splits): under ``budget`` only the labelled
    training subset and the test files; every empty class and unreadable file reported at once."""
    (train_files, train_labels), (test_files, test_labels) = train, test
    bad: list[Path] = []
    rest = None
    if budget is not None and budget != (None, None):
        kept = stratified_take(train_labels, per_class=budget[0], fraction=budget[1], seed=seed)
        rest = [train_files[i] for i in np.setdiff1d(np.arange(len(train_files)), kept)]
        train_files, train_labels = [train_files[i] for i in kept], train_labels[kept]
    base = source if source.is_dir() else source.parent
    train_split = _read_files(train_files, train_labels, size, bad, base)
    test_split = _read_files(test_files, test_labels, size, bad, base)
    if empty or (bad and not skip_bad):
        raise BadImagesError(source, empty, bad)
    return RawDataset(
        train_split,
        test_split,
        classes,
        skipped=[str(p) for p in bad],
        ignored=ignored,
        labelled=budget is not None,
        rest_files=rest,
    )


class BadRowsError(ValueError):
    """A table of images has bad rows; the message names every one by its line number."""

    def __init__(self, table: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:50] + ([f"… ({len(problems)} bad rows in all)"] if len(problems) > 50 else [])
        super().__init__(f"{table}: {len(problems)} bad row(s):\n  " + "\n  ".join(shown))


def load_image_table(
    table: str | Path,
    size: int = 96,
    skip_bad: bool = False,
    seed: int = 0,
    budget: tuple[int | None, float | None] | None = None,
) -> RawDataset:
    """A dataset from a CSV table with a header and the columns ``path`` and ``label``, and optionally
    ``split`` (``train``, ``test`` or empty for train). Paths are relative to the table's folder (or
    absolute); classes are the labels, sorted. Without a test row a stratified, seeded fifth is held
    out as test, as for an image folder. Every bad row is reported at once with its line number (a
    missing file, a file that is not an image, an empty or unprintable label, an unknown split); then
    the images are read as an image folder's (:func:`load_image_folder`, ``budget`` included)."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"image table {table} does not exist")
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(columns):
            raise ValueError(
                f"{table}: the header must name the columns path and label (and optionally split); it has {columns}"
            )
        rows = [(reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]
    problems, listed = [], []
    for line, row in rows:
        path, label, split = row.get("path", ""), row.get("label", ""), row.get("split", "").lower()
        file = table.parent / path
        found = []
        if not path:
            found.append("no path")
        elif not file.is_file():
            found.append(f"{path}: no such file")
        elif file.suffix.lower() not in IMAGE_EXTENSIONS:
            found.append(f"{path}: not an image file ({' '.join(IMAGE_EXTENSIONS)})")
        if not label or not label.isprintable():
            found.append(f"label {label!r}: empty or not printable text")
        if split not in ("", "train", "test"):
            found.append(f"split {split!r}: train, test or empty")
        problems += [f"line {line}: {p}" for p in found]
        if not found:
            listed.append((file, label, split == "test"))
    if problems:
        raise BadRowsError(table, problems)
    classes = sorted({label for _, label, _ in listed})
    if len(classes) < 2:
        raise ValueError(f"{table} has {len(classes)} label(s); image classification needs at least two")
    files = [f for f, _, _ in listed]
    labels = np.asarray([classes.index(label) for _, label, _ in listed], dtype=np.int64)
    is_test = np.asarray([t for _, _, t in listed], dtype=bool)
    if is_test.any():
        train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    else:
        train_idx, test_idx = held_out_fifth(labels, seed)
    missing = [classes[c] for c in range(len(classes)) if not (labels[train_idx] == c).any()]
    if missing:
        raise ValueError(f"{table}: label(s) {', '.join(missing)} have no training row")
    return _read_listing(
        table,
        classes,
        ([files[i] for i in train_idx], labels[train_idx]),
        ([files[i] for i in test_idx], labels[test_idx]),
        size,
        skip_bad,
        seed,
        budget,
        [],
        [],
    )


KNOWN_DATASETS = ("digits", "fashion-mnist", "imagefolder:<path>", "csv:<file>", *NAMED_DATASETS)


def _hold_out_test(train: ArraySplit, seed: int) -> tuple[ArraySplit, ArraySplit]:
    keep, test_idx = held_out_fifth(train.labels, seed)
    return train.take(keep), train.take(test_idx)


def load_source(
    dataset: str,
    root: str | Path = "data/raw",
    seed: int = 0,
    *,
    image_size: int = 96,
    skip_bad: bool = False,
    download: bool = False,
    budget: tuple[int | None, float | None] | None = None,
) -> RawDataset:
    """Load a dataset by name; see the module docstring for the names. ``budget`` (labels per class, label
    fraction) lets an image folder decode only the labelled subset (:func:`load_image_folder`)."""
    if dataset == "digits":
        return load_digits_dataset(seed)
    if dataset == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if dataset.startswith("imagefolder:"):
        return load_image_folder(dataset.split(":", 1)[1], image_size, skip_bad, seed, budget)
    if dataset.startswith("csv:"):
        return load_image_table(dataset.split(":", 1)[1], image_size, skip_bad, seed, budget)
    if dataset in NAMED_DATASETS:
        train, test, classes = load_named(dataset, root, size=image_size, download=download)
        if test is None:
            train, test = _hold_out_test(train, seed)
        return RawDataset(train, test, classes)
    raise ValueError(f"data.dataset = {dataset!r}: unknown; known: {', '.join(KNOWN_DATASETS)}")


def _labelled_indices(
    raw: RawDataset, labels_per_class: int | None, label_fraction: float | None, seed: int
) -> np.ndarray:
    """Indices into ``raw.train`` of the labelled budget (train and validation together)."""
    labels = raw.train.labels
    if raw.labelled or (labels_per_class is None and label_fraction is None):
        return np.arange(len(labels))
    return stratified_take(labels, fraction=label_fraction, per_class=labels_per_class, seed=seed)


def few_label_splits(
    raw: RawDataset, *, labels_per_class: int | None, label_fraction: float | None, val_fraction: float, seed: int
) -> tuple[ArraySplit, ArraySplit, ArraySplit]:
    """(train, val, test): the labelled budget is sampled per class from the official training
    split, validation is a stratified share of that budget, the official test split is untouched."""
    labels = raw.train.labels
    kept = _labelled_indices(raw, labels_per_class, label_fraction, seed)
    val_local = stratified_take(labels[kept], fraction=val_fraction, seed=seed + 1)
    val_idx = kept[val_local]
    train_idx = np.setdiff1d(kept, val_idx)

    splits = raw.train.take(train_idx), raw.train.take(val_idx), raw.test
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
    raw = load_source(
        cfg.dataset,
        cfg.root,
        cfg.seed,
        image_size=cfg.store_size,
        skip_bad=cfg.skip_bad,
        download=cfg.download,
        budget=(cfg.labels_per_class, cfg.label_fraction),
    )
    return raw, few_label_splits(
        raw,
        labels_per_class=cfg.labels_per_class,
        label_fraction=cfg.label_fraction,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )


# -- the unlabelled split (data.unlabelled) --------------------------------------------------------

UNLABELLED_STREAM = 0x554E4C  # the unlabelled sample's random stream: default_rng([data.seed, this])
DUPLICATE_OF = ("val", "test", "train", "within")  # what a dropped duplicate equals, counted in this order


@dataclass
class UnlabelledSplit:
    """The unlabelled images ``prepare`` keeps and how they were chosen (``stats.json: unlabelled``)."""

    images: np.ndarray  # uint8 N × H × W × C: the labelled images' size and channel count
    source: str  # "rest" or the folder
    candidates: int  # images or files it was drawn from, before the cap, duplicates and unreadable files
    dropped: dict[str, int]  # duplicates dropped, by what they equal (DUPLICATE_OF)
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped (data.skip_bad)
    ignored: list[str] = field(default_factory=list)  # files in the folder that are not images


def image_hash(image: np.ndarray) -> bytes:
    """The digest of one stored image's bytes: equal images, equal digests."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def unlabelled_folder(cfg: DataConfig) -> Path | None:
    """The folder ``data.unlabelled`` names (None for none and rest); a FileNotFoundError if it is not one."""
    if cfg.unlabelled in ("none", "rest"):
        return None
    folder = Path(cfg.unlabelled)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.unlabelled = {cfg.unlabelled!r}: no such folder (none | rest | a folder of images)"
        )
    return folder


def _image_files(folder: Path, ignored: list[str]) -> list[Path]:
    """Every file under ``folder`` with torchvision's image extensions, at any depth, sorted; others ignored."""
    files = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(f)
        elif f.is_file():
            ignored.append(str(f))
    return files


def _file_reader(files: list[Path], shape: tuple[int, ...], bad: list[Path]) -> Callable[[int], np.ndarray | None]:
    """``read(i)``: file i as the labelled images are stored (``shape``), or None (listed in ``bad``)."""

    def read(i: int) -> np.ndarray | None:
        try:
            image = _read_image(files[i], shape[0])
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(files[i])
            return None
        if shape[-1] == 1:
            image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
        return image

    return read


def _draw(
    n: int,
    read: Callable[[int], np.ndarray | None],
    shape: tuple[int, ...],
    known: dict[bytes, str],
    limit: int | None,
    seed: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """Read candidates in order (a seeded permutation under a binding ``limit``) until ``limit`` are kept,
    dropping any whose digest is in ``known`` (counted by its split) or was kept already (``within``)."""
    capped = limit is not None and limit < n
    order = np.random.default_rng([seed, UNLABELLED_STREAM]).permutation(n) if capped else np.arange(n)
    out = np.empty((limit if capped else n, *shape), np.uint8)
    dropped = dict.fromkeys(DUPLICATE_OF, 0)
    seen: set[bytes] = set()
    kept = 0
    for i in tqdm(order, desc="reading unlabelled images", disable=n < 500, leave=False):
        if kept == len(out):
            break
        image = read(int(i))
        if image is None:
            continue
        digest = image_hash(image)
        duplicate = known.get(digest) or ("within" if digest in seen else None)
        if duplicate is not None:
            dropped[duplicate] += 1
            continue
        seen.add(digest)
        out[kept] = image
        kept += 1
    return out[:kept], dropped


def load_unlabelled_split(
    cfg: DataConfig, raw: RawDataset, splits: tuple[ArraySplit, ArraySplit, ArraySplit]
) -> UnlabelledSplit | None:
    """The unlabelled split ``data.unlabelled`` asks for (None for none), never holding an image equal to
    one of the labelled (train, val, test) ``splits``; see the module docstring."""
    if cfg.unlabelled == "none":
        return None
    shape = tuple(raw.train.images.shape[1:])
    bad: list[Path] = []
    ignored: list[str] = []
    folder = unlabelled_folder(cfg)
    if folder is not None:
        files = _image_files(folder, ignored)
        if not files:
            raise ValueError(f"data.unlabelled = {cfg.unlabelled}: holds no images ({' '.join(IMAGE_EXTENSIONS)})")
        n, read, where = len(files), _file_reader(files, shape, bad), folder
    elif raw.rest_files is not None:  # an image folder read under a budget: the rest is still on disk
        n, read = len(raw.rest_files), _file_reader(raw.rest_files, shape, bad)
        where = Path(cfg.dataset.split(":", 1)[1])
    else:
        rest = np.setdiff1d(
            np.arange(len(raw.train)), _labelled_indices(raw, cfg.labels_per_class, cfg.label_fraction, cfg.seed)
        )
        n, where = len(rest), Path(cfg.dataset)

        def read(i: int) -> np.ndarray:
            return raw.train.images[rest[i]]

    known: dict[bytes, str] = {}
    for name, split in zip(("train", "test", "val"), (splits[0], splits[2], splits[1]), strict=True):
        known.update((image_hash(image), name) for image in split.images)  # later wins: val, then test
    images, dropped = _draw(n, read, shape, known, cfg.unlabelled_max, cfg.seed)
    if bad and not cfg.skip_bad:
        raise BadImagesError(where, [], bad)
    if not len(images):
        raise ValueError(
            f"data.unlabelled = {cfg.unlabelled}: no image is left of {n} (duplicates of labelled images: "
            f"{dropped['val']} val, {dropped['test']} test, {dropped['train']} train; unreadable: {len(bad)})"
        )
    return UnlabelledSplit(images, cfg.unlabelled, n, dropped, [str(p) for p in bad], ignored)
