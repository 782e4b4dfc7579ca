"""Duplicates and leakage between the splits (drtune.data_checks): planted copies are found, named and refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drtune.config import ConfigError, load_config
from drtune.data import ArraySplit
from drtune.data_checks import LeakageError, check_splits, find_duplicates
from drtune.prepared import write_prepared


def _photo(rng: np.random.Generator, side: int = 48) -> np.ndarray:
    """A smooth random RGB image (6 × 6 noise, bilinear): low frequencies, as in a photograph."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR))


def _reencoded(image: np.ndarray) -> np.ndarray:
    """The copy a scraper makes: 10 levels brighter, saved as JPEG at quality 90."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return np.asarray(Image.open(buffer))


def _split_folder(root: Path, per_class: int = 8, test_per_class: int = 4) -> dict[str, np.ndarray]:
    """train/ and test/ folders of distinct smooth images; returns each training file's pixels by name."""
    rng = np.random.default_rng(0)
    saved = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        for name in ("cat", "dog", "owl"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = _photo(rng)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
                saved[f"{split}/{name}/{i}.png"] = image
    return saved


def _cfg(tmp_path: Path, folder: Path, *extra: str):
    return load_config(
        None,
        [
            f"data.dataset=imagefolder:{folder}",
            "data.labels_per_class=null",
            "data.store_size=48",
            f"data.prepared_dir={tmp_path / 'prepared'}",
            "train.image_size=32",
            *extra,
        ],
    ).data


def test_distinct_images_give_no_pair(tmp_path) -> None:
    _split_folder(tmp_path / "images")
    stats = write_prepared(_cfg(tmp_path, tmp_path / "images"))
    checks = stats["checks"]
    assert all(c == {"exact": 0, "near": 0} for c in checks["pairs"].values())
    assert checks["test_leakage"]["images"] == 0 and checks["warnings"] == []


def test_test_copies_of_training_images_are_refused_naming_both_files(tmp_path) -> None:
    folder = tmp_path / "images"
    saved = _split_folder(folder)
    Image.fromarray(saved["train/cat/0.png"]).save(folder / "test" / "cat" / "copy.png")
    Image.fromarray(_reencoded(saved["train/dog/1.png"])).save(folder / "test" / "dog" / "reencoded.jpg")
    with pytest.raises(LeakageError) as caught:
        write_prepared(_cfg(tmp_path, folder, "data.near_copies_leak=true"))
    message = str(caught.value)
    assert "2 of 14 test images (14.29%) are exact or near copies" in message and "data.max_leakage" in message
    assert "test/cat/copy.png = train/cat/0.png" in message
    assert "test/dog/reencoded.jpg = train/dog/1.png" in message
    assert not (tmp_path / "prepared").exists()  # nothing written

    # by default only the exact copy is leakage; the near one is named in a warning
    with pytest.raises(LeakageError, match=r"1 of 14 test images \(7.14%\) are exact copies"):
        write_prepared(_cfg(tmp_path, folder))
    stats = write_prepared(_cfg(tmp_path, folder, "data.max_leakage=0.08"))
    checks = stats["checks"]
    pairs = checks["pairs"]
    assert pairs["train~test"]["exact"] + pairs["val~test"]["exact"] == 1
    assert pairs["train~test"]["near"] + pairs["val~test"]["near"] == 1
    assert checks["test_leakage"] == {"images": 1, "fraction": 1 / 14, "max": 0.08, "near_only": 1}
    assert "e.g. test/dog/reencoded.jpg ≈ train/dog/1.png" in checks["warnings"][0]
    on_disk = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert on_disk["checks"]["test_leakage"]["images"] == 1


def test_copies_with_different_labels_are_reported_not_refused() -> None:
    rng = np.random.default_rng(1)
    images = np.stack([_photo(rng) for _ in range(9)])
    train = ArraySplit(np.concatenate([images[:6], images[:1]]), np.array([0, 0, 1, 1, 2, 2, 1]))  # 0 again, as 1
    val, test = ArraySplit(images[6:8], np.array([0, 1])), ArraySplit(images[8:], np.array([2]))
    checks = check_splits({"train": train, "val": val, "test": test}, ["a", "b", "c"], 0.0)
    assert checks["pairs"]["train~train"] == {"exact": 1, "near": 0}
    assert checks["conflicting_labels"] == 1
    assert checks["conflicting_examples"][0] == {
        "kind": "exact",
        "files": ["train #0", "train #6"],
        "labels": ["a", "b"],
    }
    assert any("different labels" in w for w in checks["warnings"])


def test_a_reencoded_copy_is_near_and_a_different_image_is_not() -> None:
    rng = np.random.default_rng(2)
    a, b = _photo(rng), _photo(rng)
    flat = np.full_like(a, 128)  # no pattern: correlates with nothing, not even another flat image
    images = np.stack([a, _reencoded(a), 255 - a, b, flat, flat + 1])
    assert [(p.first, p.second, p.kind) for p in find_duplicates(images)] == [(0, 1, "near")]


def test_max_leakage_is_a_share_of_the_test_split(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.max_leakage"):
        load_config(None, ["data.max_leakage=1.5"])
