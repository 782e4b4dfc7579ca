"""Images in memory, transforms from the backbone's config, and loaders (single process or DDP).

Datasets here are uint8 arrays (N × H × W × C) with integer labels — what the ``prepare``
stage writes — so a loader step is a crop and a normalisation, cheap enough on 2 cores.
Augmentation follows the reference code: RandomResizedCrop(scale=(0.4, 1)) + horizontal flip
for training; resize to ``size / crop_pct`` then centre crop for evaluation. Mean, std and
interpolation come from the backbone's pretrained config, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

# The reference's training crop: RandomResizedCrop's area range (its default aspect range).
TRAIN_CROP_SCALE = (0.4, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)

# Every image is resized by its shorter side, so a long thin one grows by its aspect ratio: 1 × 200,000 px
# at 224 px becomes 224 × 44.8 M. Panoramas stay under 8:1; beyond MAX_ASPECT the centre crop keeps
# under 1/20 of the image anyway. MAX_PIXELS is Pillow's own decompression-bomb limit (2 × 89.5 M).
MAX_ASPECT = 20
MAX_PIXELS = 178_956_970


def check_image_size(width: int, height: int) -> None:
    """A ``ValueError`` saying why, for an image too large or too elongated to resize safely."""
    if width < 1 or height < 1:
        raise ValueError(f"{width} × {height} px is empty")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width} × {height} px is over {MAX_PIXELS:,} pixels (a decompression bomb?)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValueError(f"{width} × {height} px is more elongated than {MAX_ASPECT}:1; crop it first")


@dataclass
class ArraySplit:
    """One split: ``images`` uint8 N × H × W × C (C = 1 or 3), ``labels`` int64 N; ``names``: each image's
    file, relative to its dataset, when it was read from files (the data checks name images by it)."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> ArraySplit:
        """The images at ``index``, with their labels and names."""
        names = None if self.names is None else [self.names[i] for i in index]
        return ArraySplit(self.images[index], self.labels[index], names)


class ImageArrayDataset(Dataset):
    """Serves (transformed image, label) — or (image, label, index) with ``with_index`` — and
    turns grey images into three channels. The index lets a task look up per-image state, such
    as cached pretrained features."""

    def __init__(self, split: ArraySplit, transform: T.Transform, with_index: bool = False) -> None:
        self.split = split
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.split.images[i])).permute(2, 0, 1)
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if self.with_index:
            return self.transform(img), int(self.split.labels[i]), i
        return self.transform(img), int(self.split.labels[i])


def build_transform(data_cfg: dict, image_size: int, train: bool) -> T.Transform:
    """Reference augmentation (train) or resize + centre crop (eval), normalised per ``data_cfg``."""
    interp = InterpolationMode(data_cfg.get("interpolation", "bilinear"))
    if train:
        geometry = [
            T.RandomResizedCrop(
                image_size, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO, interpolation=interp, antialias=True
            ),
            T.RandomHorizontalFlip(),
        ]
    else:
        resize = int(round(image_size / data_cfg.get("crop_pct", 0.875)))
        geometry = [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(image_size)]
    return T.Compose(
        [
            *geometry,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(data_cfg["mean"]), std=list(data_cfg["std"])),
        ]
    )


def build_loader(
    split: ArraySplit,
    data_cfg: dict,
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool = False,
    with_index: bool = False,
) -> DataLoader:
    """A loader over ``split``. Training loaders shuffle with a seeded generator and drop the last
    partial batch, so every rank enqueues the same number of rows; set the epoch with
    :func:`set_epoch` for a different, reproducible order each epoch. ``with_index`` adds each
    image's position in ``split`` to the batch: ``(x, y, index)``."""
    dataset = ImageArrayDataset(split, build_transform(data_cfg, image_size, train), with_index)
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=False,
    )


def set_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the loader's shuffling and worker seeds a function of (seed, epoch): exact resume."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
