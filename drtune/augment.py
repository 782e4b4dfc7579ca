"""Training batches augmented on the device: the split in GPU memory, crops and flips batched.

On a GPU the CPU loader is what limits a run, not the step: measured on an H200 (Fashion-MNIST,
8,000 images, 224 px, batch 128), ResNet-50's CE step runs at 3,903 images/s alone but 1,176
with 12 loader processes doing the reference augmentation. A few-label split is small (600
images at 96 px are 16 MiB as uint8), so :class:`DeviceBatches` copies it to the device once and
augments a whole batch with three kernels: a gather of the batch's uint8 images, one
``roi_align`` that resamples every image's own random crop to ``image_size`` (bilinear, with
``ceil(crop / size)`` samples averaged per output pixel when shrinking, an area filter that
stands in for torchvision's antialiasing), and a masked flip. The crop parameters follow
``RandomResizedCrop.get_params`` exactly (area in ``TRAIN_CROP_SCALE``, log-uniform aspect in
[3/4, 4/3], ten tries, then the centre crop) and are drawn on the CPU from the loader's seeded
generator, so the batches are a function of (seed, epoch) and a resumed run sees the same ones.

It differs from the CPU loader in one way: resampling is bilinear whatever the backbone's
pretrained interpolation (bicubic for EfficientNet), since ``roi_align`` has no bicubic mode.
Evaluation keeps the CPU transform, so validation and the served model see the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, RandomSampler
from torchvision.ops import roi_align

from drtune.data import TRAIN_CROP_RATIO, TRAIN_CROP_SCALE, ArraySplit

# "auto" augments on a CUDA device when the split's uint8 images fit in this much memory.
DEVICE_SPLIT_LIMIT_BYTES = 2 << 30


def augment_on_device(choice: str, device: torch.device, split: ArraySplit) -> bool:
    """Whether training batches are augmented on ``device``: ``device``/``loader`` as asked; ``auto``
    on CUDA when the split's images fit in :data:`DEVICE_SPLIT_LIMIT_BYTES`, never on the CPU (where
    the loader's per-image work is as fast and the step needs the cores)."""
    if choice != "auto":
        return choice == "device"
    return device.type == "cuda" and split.images.nbytes <= DEVICE_SPLIT_LIMIT_BYTES


def random_resized_crop_boxes(
    heights: int,
    widths: int,
    n: int,
    generator: torch.Generator,
    scale: tuple[float, float] = TRAIN_CROP_SCALE,
    ratio: tuple[float, float] = TRAIN_CROP_RATIO,
    tries: int = 10,
) -> Tensor:
    """``n`` crop boxes ``(x0, y0, x1, y1)`` (pixel edges, float) drawn as ``RandomResizedCrop.get_params``
    draws them: the first of ``tries`` (area, aspect) draws that fits the image, else the centre crop
    with the aspect clamped to ``ratio``."""
    area = heights * widths
    target = area * torch.empty(n, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), -1)
    # The centre crop torchvision falls back to.
    in_ratio = widths / heights
    if in_ratio < ratio[0]:
        fw, fh = widths, round(widths / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(heights * ratio[1]), heights
    else:
        fw, fh = widths, heights
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[rows, pick], torch.tensor(float(fw)))
    h = torch.where(first >= 0, h[rows, pick], torch.tensor(float(fh)))
    # torch.randint(0, H - h + 1) per row: floor of a uniform draw over the allowed offsets.
    y0 = torch.floor(torch.rand(n, generator=generator) * (heights - h + 1))
    x0 = torch.floor(torch.rand(n, generator=generator) * (widths - w + 1))
    y0 = torch.where(first >= 0, y0, torch.floor((heights - h) / 2 + 0.5))
    x0 = torch.where(first >= 0, x0, torch.floor((widths - w) / 2 + 0.5))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def crop_resize_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """Resample each uint8 ``images[b]`` (B × C × H × W) inside ``boxes[b]`` to ``size × size``, mirror
    the rows where ``flip``, scale to [0, 1], normalise, and give grey images three channels."""
    x = images.float()
    index = torch.arange(len(x), device=x.device, dtype=x.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(device=x.device, dtype=x.dtype)], dim=1)
    # aligned=True: box edges are pixel edges, so a box of the whole image maps onto the whole output.
    out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flip.to(out.device).view(-1, 1, 1, 1), out.flip(-1), out)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return (out / 255.0 - mean) / std


class DeviceBatches:
    """Augmented training batches ``(x, y, index)`` from a split held on ``device``.

    A drop-in for the training :class:`~torch.utils.data.DataLoader` of :func:`drtune.data.build_loader`:
    the same samplers (a seeded :class:`RandomSampler`, or a :class:`DistributedSampler` that drops
    the last partial batch), the same ``generator`` and ``sampler`` attributes for
    :func:`drtune.data.set_epoch`, full batches only, and the index of each image in the split.
    """

    def __init__(
        self,
        split: ArraySplit,
        data_cfg: dict,
        image_size: int,
        batch_size: int,
        device: torch.device,
        *,
        seed: int = 0,
        distributed: bool = False,
    ) -> None:
        # N × C × H × W uint8; grey images keep one channel until after the crop.
        self.images = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(split.labels).long().to(device)
        self.image_size, self.batch_size, self.device = image_size, batch_size, device
        self.mean = torch.tensor(data_cfg["mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data_cfg["std"], device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)
        positions = range(len(split))
        self.sampler = (
            DistributedSampler(positions, shuffle=True, seed=seed, drop_last=True)
            if distributed
            else RandomSampler(positions, generator=self.generator)
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        _, _, height, width = self.images.shape
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            boxes = random_resized_crop_boxes(height, width, len(index), self.generator)
            flip = torch.rand(len(index), generator=self.generator) < 0.5
            on_device = index.to(self.device, non_blocking=True)
            x = crop_resize_flip(
                self.images.index_select(0, on_device), boxes, flip, self.image_size, self.mean, self.std
            )
            yield x, self.labels.index_select(0, on_device), index
