"""Device augmentation: torchvision's crop distribution, exact crops and flips, seeded batches, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as V1
from torchvision.transforms import v2 as T

from drtune.augment import DeviceBatches, augment_on_device, crop_resize_flip, random_resized_crop_boxes
from drtune.data import TRAIN_CROP_RATIO, TRAIN_CROP_SCALE, ArraySplit, set_epoch

IDENTITY = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))


def _smooth_image(h: int = 96, w: int = 96) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    return (127 + 100 * torch.sin(xx / 9) * torch.cos(yy / 13)).round().to(torch.uint8)


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    """20,000 boxes against 20,000 of ``RandomResizedCrop.get_params`` on a 96 × 80 image: the mean area
    fraction, the mean log aspect and the mean centre agree to within sampling noise (standard errors
    are about 0.001, 0.001 and 0.1 px), and every box lies inside the image within the area range."""
    n, h, w = 20_000, 96, 80
    boxes = random_resized_crop_boxes(h, w, n, torch.Generator().manual_seed(0))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    torch.manual_seed(0)
    ref = torch.tensor(
        [V1.RandomResizedCrop.get_params(torch.zeros(1, h, w), TRAIN_CROP_SCALE, TRAIN_CROP_RATIO) for _ in range(n)]
    ).float()  # (top, left, height, width)
    assert float((bw * bh).mean()) / (h * w) == pytest.approx(
        float((ref[:, 2] * ref[:, 3]).mean()) / (h * w), abs=0.006
    )
    assert float((bw / bh).log().mean()) == pytest.approx(float((ref[:, 3] / ref[:, 2]).log().mean()), abs=0.006)
    assert float((boxes[:, 0] + bw / 2).mean()) == pytest.approx(float((ref[:, 1] + ref[:, 3] / 2).mean()), abs=0.5)
    assert boxes[:, :2].min() >= 0 and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    # rounding w and h moves the area by at most about one row and one column of pixels
    assert ((bw * bh) / (h * w) >= TRAIN_CROP_SCALE[0] - 0.03).all()


def test_a_crop_at_output_size_is_the_exact_pixels_and_flip_mirrors_them() -> None:
    img = _smooth_image()[None, None].expand(1, 3, -1, -1)
    box = torch.tensor([[10.0, 20.0, 42.0, 52.0]])  # x0, y0, x1, y1: a 32 × 32 crop
    plain = crop_resize_flip(img, box, torch.tensor([False]), 32, **IDENTITY) * 255
    flipped = crop_resize_flip(img, box, torch.tensor([True]), 32, **IDENTITY) * 255
    expected = img[..., 20:52, 10:42].float()
    assert torch.equal(plain.round(), expected)
    assert torch.equal(flipped.round(), expected.flip(-1))


def test_whole_image_resize_matches_torchvision_antialiased_bilinear() -> None:
    """Shrinking 96 → 64 averages 2 × 2 bilinear samples per pixel; on a smooth image it stays within
    1/255 of torchvision's antialiased bilinear resize (measured: 0.0027 max on the [0, 1] scale)."""
    img = _smooth_image()[None, None].expand(1, 3, -1, -1)
    ours = crop_resize_flip(img, torch.tensor([[0.0, 0.0, 96.0, 96.0]]), torch.tensor([False]), 64, **IDENTITY)
    theirs = T.Resize(64, antialias=True)(img.float()) / 255
    assert (ours - theirs).abs().max() < 0.004


def _split(n: int = 40) -> ArraySplit:
    rng = np.random.default_rng(0)
    return ArraySplit(rng.integers(0, 256, size=(n, 24, 24, 1), dtype=np.uint8), np.arange(n) % 4)


def test_device_batches_cover_the_split_once_per_epoch_and_repeat_per_seed_and_epoch() -> None:
    split = _split()
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    loader = DeviceBatches(split, cfg, image_size=16, batch_size=8, device=torch.device("cpu"), seed=3)
    assert len(loader) == 5

    def epoch(e: int) -> list:
        set_epoch(loader, 3, e)
        return list(loader)

    first, again, other = epoch(0), epoch(0), epoch(1)
    index = torch.cat([i for _, _, i in first])
    assert sorted(index.tolist()) == list(range(40))
    for (x, y, i), (x2, _, i2) in zip(first, again, strict=True):
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
        assert torch.equal(y, torch.from_numpy(split.labels)[i])
        assert torch.equal(i, i2) and torch.equal(x, x2)
    assert not torch.equal(first[0][0], other[0][0])


def test_auto_augments_on_the_device_only_for_cuda() -> None:
    split = _split()
    assert not augment_on_device("auto", torch.device("cpu"), split)
    assert augment_on_device("auto", torch.device("cuda", 0), split)
    assert augment_on_device("device", torch.device("cpu"), split)
    assert not augment_on_device("loader", torch.device("cuda", 0), split)
