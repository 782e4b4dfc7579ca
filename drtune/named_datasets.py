"""The paper's benchmarks by name, through torchvision, with their official train/test splits.

``cifar10``, ``cifar100``, ``dtd``, ``caltech101``, ``fgvc-aircraft``, ``stanford-cars``,
``oxford-pets``, ``flowers102``, ``svhn``, ``sun397``. Each is read from ``<root>`` in the layout
torchvision expects; when it is missing and ``data.download`` is on, torchvision downloads it.
Offline with no copy the error names the folder and the files to put there. Where a dataset has
a validation split (DTD, Flowers102) it joins the training split, since our validation set is
carved from the training split; Caltech101 and SUN397 have no official split in torchvision, so
a seeded, stratified fifth is held out as test (as for image folders).

Images are stored like image folders: RGB, shorter side resized to ``store_size`` and centre
cropped, except the 32 px sets (CIFAR, SVHN), which are kept at their native size.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from drtune.data import ArraySplit, check_image_size


@dataclass(frozen=True)
class NamedDataset:
    """How to read one torchvision dataset: its class, the parts of each split, where it lives."""

    cls: str
    train: tuple[dict, ...]
    test: tuple[dict, ...] | None  # None: no official split, hold out a seeded fifth
    expected: str  # what torchvision looks for under <root>


NAMED_DATASETS: dict[str, NamedDataset] = {
    "cifar10": NamedDataset(
        "CIFAR10",
        ({"train": True},),
        ({"train": False},),
        "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta from cifar-10-python.tar.gz)",
    ),
    "cifar100": NamedDataset(
        "CIFAR100",
        ({"train": True},),
        ({"train": False},),
        "cifar-100-python/ (train, test, meta from cifar-100-python.tar.gz)",
    ),
    "dtd": NamedDataset(
        "DTD",
        ({"split": "train"}, {"split": "val"}),
        ({"split": "test"},),
        "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt (dtd-r1.0.1.tar.gz)",
    ),
    "caltech101": NamedDataset(
        "Caltech101", ({},), None, "caltech101/101_ObjectCategories/<class>/*.jpg and caltech101/Annotations/"
    ),
    "fgvc-aircraft": NamedDataset(
        "FGVCAircraft",
        ({"split": "trainval"},),
        ({"split": "test"},),
        "fgvc-aircraft-2013b/ (fgvc-aircraft-2013b.tar.gz extracted)",
    ),
    "stanford-cars": NamedDataset(
        "StanfordCars",
        ({"split": "train"},),
        ({"split": "test"},),
        "stanford_cars/ (cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat)",
    ),
    "oxford-pets": NamedDataset(
        "OxfordIIITPet",
        ({"split": "trainval"},),
        ({"split": "test"},),
        "oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt",
    ),
    "flowers102": NamedDataset(
        "Flowers102",
        ({"split": "train"}, {"split": "val"}),
        ({"split": "test"},),
        "flowers-102/jpg/*.jpg, flowers-102/imagelabels.mat, flowers-102/setid.mat",
    ),
    "svhn": NamedDataset("SVHN", ({"split": "train"},), ({"split": "test"},), "train_32x32.mat and test_32x32.mat"),
    "sun397": NamedDataset("SUN397", ({},), None, "SUN397/<letter>/<class>/*.jpg and SUN397/ClassName.txt"),
}


def square_rgb(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image → RGB uint8, shorter side resized to ``size``, centre crop ``size`` × ``size``."""
    check_image_size(*img.size)
    rgb = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    rgb = rgb.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = rgb.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _open(name: str, spec: NamedDataset, root: Path, kwargs: dict, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls)
    try:
        return cls(root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as missing:
        reason = f"not found ({missing})"
    if download:
        try:
            return cls(root, download=True, **kwargs)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as err:
            reason = f"not found, and the download failed ({type(err).__name__}: {err})"
    else:
        reason += "; data.download is off"
    raise FileNotFoundError(
        f"data.dataset = {name!r}: {reason}. Put {spec.expected} under {root}/ "
        "(the layout torchvision expects) or run once where it can download."
    )


def _to_split(ds, size: int, desc: str) -> ArraySplit:
    """Every image of a torchvision dataset as a uint8 array (fast paths for the in-memory 32 px sets)."""
    data = getattr(ds, "data", None)
    if isinstance(data, np.ndarray) and data.ndim == 4:
        images = data.transpose(0, 2, 3, 1) if data.shape[1] == 3 else data  # SVHN is N × 3 × 32 × 32
        labels = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)), dtype=np.int64)
        return ArraySplit(np.ascontiguousarray(images), labels)
    images, labels = [], []
    for i in tqdm(range(len(ds)), desc=desc, leave=False, disable=len(ds) < 500):
        img, label = ds[i]
        images.append(square_rgb(img, size))
        labels.append(int(label))
    return ArraySplit(np.stack(images), np.asarray(labels, dtype=np.int64))


def _classes(ds, n: int) -> list[str]:
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    return [str(c) for c in names] if names else [str(i) for i in range(n)]


def load_named(
    name: str, root: str | Path, *, size: int, download: bool
) -> tuple[ArraySplit, ArraySplit | None, list[str]]:
    """(official train, official test or None, class names) of a torchvision dataset."""
    spec = NAMED_DATASETS[name]
    root = Path(root)
    parts = [_open(name, spec, root, kw, download) for kw in spec.train]
    train_parts = [_to_split(ds, size, f"reading {name}") for ds in parts]
    train = ArraySplit(np.concatenate([p.images for p in train_parts]), np.concatenate([p.labels for p in train_parts]))
    test = None
    if spec.test is not None:
        test = _to_split(_open(name, spec, root, spec.test[0], download), size, f"reading {name} test")
    n = int(max(train.labels.max(), -1 if test is None else test.labels.max())) + 1
    return train, test, _classes(parts[0], n)
