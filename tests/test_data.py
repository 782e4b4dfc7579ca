"""Data: sources, seeded stratified splits, the prepare stage, and each bad input's own error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drtune.config import ConfigError, load_config
from drtune.data import ArraySplit
from drtune.folds import extra_fold, max_extra_folds
from drtune.prepared import data_checksum, load_prepared, load_unlabelled, unlabelled_checksum
from drtune.prepared import write_prepared as prepare
from drtune.sources import (
    BadImagesError,
    fashion_mnist_dir,
    few_label_splits,
    load_source,
    stratified_take,
)


def _folder(root, classes=("cat", "dog", "owl"), per_class=10):
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P"]
    for name in classes:
        for i in range(per_class):
            sub = root / name / ("nested" if i % 3 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            arr = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(modes[i % 4])
            img.save(sub / f"{i}.{['png', 'jpg', 'webp', 'bmp'][i % 4] if modes[i % 4] != 'RGBA' else 'png'}")
    return root


def _cfg(tmp_path, **kw):
    overrides = [f"data.{k}={v}" for k, v in kw.items()]
    return load_config(None, [*overrides, f"data.prepared_dir={tmp_path / 'prepared'}", "train.image_size=16"]).data


def test_digits_splits_are_disjoint_stratified_and_seeded(tmp_path) -> None:
    cfg = _cfg(tmp_path, dataset="digits", labels_per_class=30, val_fraction=0.2)
    stats = prepare(cfg)
    assert stats["counts"]["train"] == [24] * 10 and stats["counts"]["val"] == [6] * 10
    data = load_prepared(cfg.prepared_dir)
    train, val = data.train, data.val

    def rows(s):
        return {a.tobytes() + bytes([int(b)]) for a, b in zip(s.images, s.labels, strict=True)}

    assert not rows(train) & rows(val)
    again = prepare(cfg)
    assert again["sha256"] == stats["sha256"]
    other = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, seed=1))
    assert other["sha256"]["train"] != stats["sha256"]["train"]


def test_label_fraction_counts_are_exact() -> None:
    raw = load_source("digits")
    train, val, _ = few_label_splits(raw, labels_per_class=None, label_fraction=0.5, val_fraction=0.25, seed=0)
    per_class = np.bincount(raw.train.labels)
    kept = np.bincount(train.labels) + np.bincount(val.labels)
    assert (kept == np.round(per_class * 0.5)).all()


def test_image_folder_any_mode_nested(tmp_path) -> None:
    root = _folder(tmp_path / "imgs")
    raw = load_source(f"imagefolder:{root}", image_size=16)
    assert raw.classes == ["cat", "dog", "owl"]
    assert raw.train.images.shape[1:] == (16, 16, 3) and len(raw.train) + len(raw.test) == 30
    assert np.bincount(raw.test.labels).tolist() == [2, 2, 2]


def test_corrupt_image_fails_listing_it_or_is_skipped(tmp_path) -> None:
    root = _folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(BadImagesError, match="broken.jpg"):
        load_source(f"imagefolder:{root}", image_size=16)
    stats = prepare(
        _cfg(tmp_path, dataset=f"imagefolder:{root}", labels_per_class="null", skip_bad="true", store_size=16)
    )
    assert stats["skipped_bad_files"] == 1


def test_an_elongated_image_is_a_bad_file_not_a_memory_bomb(tmp_path) -> None:
    """2 × 3,000 px would be resized by its shorter side to 16 × 24,000 (at 224 px: 224 × 336,000)."""
    from PIL import Image

    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((2, 3000, 3), np.uint8)).save(root / "owl" / "long.png")
    with pytest.raises(BadImagesError, match="long.png"):
        load_source(f"imagefolder:{root}", image_size=16)


def test_a_class_folder_whose_name_is_not_utf8_is_refused_at_prepare(tmp_path) -> None:
    """Its name would become a label that MLflow, JSON and CSV cannot carry: refused before any training."""
    import os

    root = _folder(tmp_path / "imgs")
    os.rename(root / "owl", os.path.join(os.fsencode(root), b"ow\xffl"))
    with pytest.raises(ValueError, match=r"printable UTF-8 text; rename 'ow\\udcffl'"):
        load_source(f"imagefolder:{root}")


def test_empty_class_and_single_class_are_errors(tmp_path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        load_source(f"imagefolder:{root}")
    one = _folder(tmp_path / "one", classes=("only",))
    with pytest.raises(ValueError, match="at least two"):
        load_source(f"imagefolder:{one}")


def test_a_class_left_without_validation_images_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no validation images"):
        prepare(_cfg(tmp_path, dataset="digits", labels_per_class=1, val_fraction=0.2))


def test_unknown_dataset_lists_known_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="known: digits, fashion-mnist"):
        prepare(_cfg(tmp_path, dataset="imagenet-42"))


def test_failed_prepare_keeps_previous_output(tmp_path) -> None:
    good = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30))
    with pytest.raises(ValueError):
        prepare(_cfg(tmp_path, dataset="digits", labels_per_class=1))
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert stats["sha256"] == good["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no staging folder left behind


def test_fashion_mnist_when_installed(tmp_path) -> None:
    try:
        fashion_mnist_dir(tmp_path)
    except FileNotFoundError as err:
        assert "train-images-idx3-ubyte.gz" in str(err)
        pytest.skip("Fashion-MNIST files are not installed on this machine")
    raw = load_source("fashion-mnist", root=tmp_path)
    assert raw.train.images.shape == (60000, 28, 28, 1) and raw.test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(raw.train.labels).tolist() == [6000] * 10


def _fake_dtd(root, classes=("banded", "dotted", "woven"), per_class=6):
    """A folder in torchvision's DTD layout (images/<class>/, labels/{train,val,test}1.txt)."""
    base = root / "dtd" / "dtd"
    rng = np.random.default_rng(1)
    lists = {"train": [], "val": [], "test": []}
    for c in classes:
        (base / "images" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 50 + i, 3), dtype=np.uint8)).save(
                base / "images" / c / f"{c}_{i}.jpg"
            )
            lists[("train", "train", "val", "val", "test", "test")[i]].append(f"{c}/{c}_{i}.jpg")
    (base / "labels").mkdir()
    for split, lines in lists.items():
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def test_torchvision_dataset_keeps_official_split(tmp_path) -> None:
    _fake_dtd(tmp_path)
    raw = load_source("dtd", root=tmp_path, image_size=24)
    assert raw.classes == ["banded", "dotted", "woven"]
    assert raw.train.images.shape == (12, 24, 24, 3)  # DTD's train + val parts
    assert raw.test.images.shape == (6, 24, 24, 3) and np.bincount(raw.test.labels).tolist() == [2, 2, 2]


@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py"), ("oxford-pets", "oxford-iiit-pet")])
def test_missing_torchvision_dataset_says_where_to_put_it(tmp_path, name, expected) -> None:
    with pytest.raises(FileNotFoundError, match=expected) as err:
        load_source(name, root=tmp_path, download=False)
    assert "data.download is off" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_fashion_mnist_offline_names_the_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("drtune.sources.SYSTEM_DATASETS", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz") as err:
        fashion_mnist_dir(tmp_path, download=False)
    assert str(tmp_path / "fashion-mnist") in str(err.value)


def test_every_problem_of_an_image_folder_is_reported_in_one_run(tmp_path) -> None:
    """An empty class no longer hides corrupt files; skipped and ignored files are listed in stats.json."""
    root = _folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    for name in ("a.png", "b.jpg"):
        (root / "dog" / name).write_bytes(b"not an image")
    (root / "notes.txt").write_text("a stray file")
    (root / "cat" / "readme.md").write_text("not an image either")
    with pytest.raises(BadImagesError) as err:
        load_source(f"imagefolder:{root}", image_size=16)
    message = str(err.value)
    assert "3 problem(s)" in message and "empty holds no images" in message
    assert "dog/a.png" in message and "dog/b.jpg" in message
    (root / "empty").rmdir()
    stats = prepare(
        _cfg(tmp_path, dataset=f"imagefolder:{root}", labels_per_class="null", skip_bad="true", store_size=16)
    )
    assert stats["skipped_bad_files"] == 2 and sorted(Path(p).name for p in stats["skipped_files"]) == [
        "a.png",
        "b.jpg",
    ]
    assert sorted(Path(p).name for p in stats["ignored_files"]) == ["notes.txt", "readme.md"]


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_train_and_val_or_test_folders_are_splits_not_classes(tmp_path, held_out) -> None:
    root = tmp_path / "imgs"
    _folder(root / "train")
    _folder(root / held_out, per_class=4)
    raw = load_source(f"imagefolder:{root}", image_size=16)
    assert raw.classes == ["cat", "dog", "owl"]
    assert len(raw.train) == 30 and len(raw.test) == 12


def test_class_discovery_and_extensions_follow_torchvision(tmp_path) -> None:
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path / "imgs")
    Image.new("L", (12, 9)).save(root / "owl" / "grey.tiff")
    Image.new("RGB", (12, 9)).save(root / "cat" / "photo.ppm")
    ours = load_source(f"imagefolder:{root}", image_size=16)
    theirs = ImageFolder(str(root))
    assert ours.classes == theirs.classes
    assert len(ours.train) + len(ours.test) == len(theirs.samples) == 32


def test_store_size_below_image_size_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data.store_size = 32 is smaller than train.image_size = 64"):
        load_config(None, ["data.dataset=imagefolder:/x", "data.store_size=32", "train.image_size=64"])


@pytest.mark.parametrize("layout", ["one folder", "train + test"])
def test_only_the_labelled_subset_is_decoded_and_the_splits_are_the_same(tmp_path, monkeypatch, layout) -> None:
    """Under a label budget an image folder decodes the test images and only the labelled training images,
    and few_label_splits gives exactly the splits that decoding every file gives."""
    import drtune.sources as sources

    root = tmp_path / "imgs"
    if layout == "one folder":
        _folder(root, per_class=20)
    else:
        _folder(root / "train", per_class=20)
        _folder(root / "test", per_class=4)
    full = load_source(f"imagefolder:{root}", image_size=16)
    decoded = []
    read = sources._read_image
    monkeypatch.setattr(sources, "_read_image", lambda path, size: decoded.append(path) or read(path, size))
    subset = load_source(f"imagefolder:{root}", image_size=16, budget=(3, None))
    assert len(decoded) == 9 + len(full.test)  # 3 per class, and the test split
    split = dict(labels_per_class=3, label_fraction=None, val_fraction=0.34, seed=0)
    for a, b in zip(few_label_splits(full, **split), few_label_splits(subset, **split), strict=True):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_extra_folds_hold_out_disjoint_stratified_blocks_of_the_training_split() -> None:
    # 3 classes; images carry their own id in pixel 0 so every image can be followed through the folds
    labels = np.repeat([0, 1, 2], [20, 25, 30])
    ids = np.arange(len(labels))
    images = np.zeros((len(labels), 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = ids
    val_idx = np.concatenate([np.flatnonzero(labels == c)[:k] for c, k in ((0, 4), (1, 5), (2, 6))])
    train_idx = np.setdiff1d(ids, val_idx)
    train, val = ArraySplit(images[train_idx], labels[train_idx]), ArraySplit(images[val_idx], labels[val_idx])
    assert max_extra_folds(train, val) == 4  # 16 // 4, 20 // 5, 24 // 6
    held_out = [set(val.images[:, 0, 0, 0])]
    for fold in range(1, 5):
        fold_train, fold_val = extra_fold(train, val, fold, seed=3)
        assert np.array_equal(np.bincount(fold_val.labels), np.bincount(val.labels))  # val's per-class sizes
        assert len(fold_train) == len(train)  # every fold trains on as many images as the search did
        seen_val, seen_train = set(fold_val.images[:, 0, 0, 0]), set(fold_train.images[:, 0, 0, 0])
        assert not seen_val & seen_train and seen_val | seen_train == set(ids)
        assert np.array_equal(fold_val.labels, labels[sorted(seen_val)])  # images keep their labels
        assert all(not seen_val & before for before in held_out)  # disjoint from val and from earlier folds
        held_out.append(seen_val)
    again = extra_fold(train, val, 2, seed=3)[1]
    assert np.array_equal(again.images, extra_fold(train, val, 2, seed=3)[1].images)
    assert set(extra_fold(train, val, 2, seed=4)[1].images[:, 0, 0, 0]) != held_out[2]


# -- the unlabelled split (data.unlabelled) --------------------------------------------------------


def _rows(images) -> set[bytes]:
    return {image.tobytes() for image in images}


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def test_default_none_writes_no_unlabelled_split_and_leaves_the_labelled_checksums(tmp_path) -> None:
    rest = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest"))
    assert (tmp_path / "prepared" / "unlabelled.npz").is_file()
    stats = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30))  # over the rest run's output
    assert stats["unlabelled"] is None and unlabelled_checksum(stats) is None
    assert not (tmp_path / "prepared" / "unlabelled.npz").exists()
    assert stats["sha256"] == rest["sha256"] and data_checksum(stats) == data_checksum(rest)
    assert load_prepared(tmp_path / "prepared").checksum == data_checksum(rest)
    with pytest.raises(FileNotFoundError, match="no unlabelled split: set data.unlabelled"):
        load_unlabelled(tmp_path / "prepared")


def test_rest_keeps_exactly_the_training_images_beyond_the_budget(tmp_path) -> None:
    stats = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest"))
    raw = load_source("digits")
    beyond = np.setdiff1d(np.arange(len(raw.train)), stratified_take(raw.train.labels, per_class=30, seed=0))
    assert len(beyond) == len(raw.train) - 300
    data = load_prepared(tmp_path / "prepared")
    labelled = _rows(data.train.images) | _rows(data.val.images) | _rows(data.test.images)
    expected = _rows(raw.train.images[beyond]) - labelled  # duplicates of a labelled image, and within, go
    images = load_unlabelled(tmp_path / "prepared")
    assert images.dtype == np.uint8 and images.shape[1:] == data.train.images.shape[1:] == (8, 8, 1)
    assert len(images) == len(_rows(images)) == len(expected) and _rows(images) == expected
    unlabelled = stats["unlabelled"]
    assert unlabelled["source"] == "rest" and unlabelled["count"] == len(images)
    assert unlabelled["candidates"] == len(beyond) == len(images) + sum(unlabelled["dropped_duplicates"].values())
    assert set(unlabelled["dropped_duplicates"]) == {"val", "test", "train", "within"}
    assert unlabelled_checksum(stats) == unlabelled["sha256"][:16]


def test_unlabelled_max_caps_the_split_with_a_seeded_sample(tmp_path) -> None:
    full = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest"))
    everything = _rows(load_unlabelled(tmp_path / "prepared"))
    capped = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest", unlabelled_max=100))
    sample = load_unlabelled(tmp_path / "prepared")
    assert capped["unlabelled"]["count"] == len(sample) == len(_rows(sample)) == 100 and _rows(sample) <= everything
    again = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest", unlabelled_max=100))
    assert again["unlabelled"]["sha256"] == capped["unlabelled"]["sha256"]
    assert capped["sha256"] == full["sha256"]  # the labelled splits do not move
    other = prepare(
        _cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest", unlabelled_max=100, seed=1)
    )
    assert other["unlabelled"]["sha256"] != capped["unlabelled"]["sha256"]
    loose = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled="rest", unlabelled_max=10**6))
    assert loose["unlabelled"]["sha256"] == full["unlabelled"]["sha256"]  # a cap that does not bind changes nothing


def test_an_unlabelled_folder_never_holds_a_validation_or_test_image_by_content(tmp_path) -> None:
    """Exact copies of labelled images, under other names and folders, are dropped and counted by split."""
    root = _folder(tmp_path / "imgs")
    labelled = dict(dataset=f"imagefolder:{root}", labels_per_class=6, val_fraction=0.34, store_size=16)
    plain = prepare(_cfg(tmp_path, **labelled))
    data = load_prepared(tmp_path / "prepared")
    unl = tmp_path / "unlabelled"
    _save(data.val.images[0], unl / "a" / "b" / "copy-of-val.png")
    _save(data.val.images[1], unl / "val1.bmp")
    _save(data.test.images[0], unl / "c" / "copy-of-test.png")
    _save(data.train.images[0], unl / "copy-of-train.png")
    rng = np.random.default_rng(7)
    fresh = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    for i, image in enumerate(fresh):
        _save(image, unl / "new" / f"{i}.png")
    _save(fresh[0], unl / "new" / "deeper" / "again.png")
    (unl / "notes.txt").write_text("not an image")
    stats = prepare(_cfg(tmp_path, **labelled, unlabelled=str(unl)))
    assert stats["sha256"] == plain["sha256"]
    unlabelled = stats["unlabelled"]
    assert unlabelled["dropped_duplicates"] == {"val": 2, "test": 1, "train": 1, "within": 1}
    assert unlabelled["count"] == 5 and unlabelled["candidates"] == 10 and unlabelled["source"] == str(unl)
    assert [Path(p).name for p in unlabelled["ignored_files"]] == ["notes.txt"]
    images = load_unlabelled(tmp_path / "prepared")
    assert _rows(images) == _rows(fresh)
    assert not _rows(images) & (_rows(data.val.images) | _rows(data.test.images) | _rows(data.train.images))


def test_a_folder_of_rgb_images_takes_the_labelled_size_and_channels(tmp_path) -> None:
    """Digits are 8 × 8 × 1: a folder's RGB photos are stored so, and a planted test digit is still caught."""
    plain = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30))
    test = load_prepared(tmp_path / "prepared").test
    unl = tmp_path / "unlabelled"
    rng = np.random.default_rng(3)
    for i in range(4):
        _save(rng.integers(0, 255, (30, 20 + i, 3), dtype=np.uint8), unl / f"{i}.jpg")
    _save(np.repeat(test.images[5], 3, axis=-1), unl / "digit.png")  # a test digit as an RGB file
    stats = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled=str(unl)))
    assert stats["unlabelled"]["count"] == 4 and stats["unlabelled"]["dropped_duplicates"]["test"] == 1
    assert load_unlabelled(tmp_path / "prepared").shape == (4, 8, 8, 1) and stats["sha256"] == plain["sha256"]


def test_rest_of_an_image_folder_is_decoded_only_when_asked(tmp_path, monkeypatch) -> None:
    import drtune.sources as sources

    root = _folder(tmp_path / "imgs", per_class=10)  # 30 files: 6 test, 24 train, 4 per class labelled
    decoded = []
    read = sources._read_image
    monkeypatch.setattr(sources, "_read_image", lambda path, size: decoded.append(path) or read(path, size))
    labelled = dict(dataset=f"imagefolder:{root}", labels_per_class=4, val_fraction=0.25, store_size=16)
    plain = prepare(_cfg(tmp_path, **labelled))
    assert len(decoded) == 12 + 6
    decoded.clear()
    stats = prepare(_cfg(tmp_path, **labelled, unlabelled="rest"))
    assert len(decoded) == 30 and stats["sha256"] == plain["sha256"]
    full = load_source(f"imagefolder:{root}", image_size=16)
    data = load_prepared(tmp_path / "prepared")
    images = load_unlabelled(tmp_path / "prepared")
    assert stats["unlabelled"]["count"] == len(images) == 12 and images.shape[1:] == (16, 16, 3)
    assert _rows(images) | _rows(data.train.images) | _rows(data.val.images) == _rows(full.train.images)


def test_every_bad_file_of_an_unlabelled_folder_is_reported_in_one_run(tmp_path) -> None:
    import io

    unl = tmp_path / "unlabelled"
    rng = np.random.default_rng(5)
    for i in range(3):
        _save(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), unl / "x" / "y" / f"{i}.png")
    (unl / "x" / "corrupt.png").write_bytes(b"\x89PNG not really")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (unl / "x" / "y" / "z").mkdir()
    (unl / "x" / "y" / "z" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImagesError) as err:
        prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled=str(unl)))
    message = str(err.value)
    assert "2 problem(s)" in message and "data.skip_bad" in message
    assert f"unreadable image: {unl / 'x' / 'corrupt.png'}" in message
    assert f"unreadable image: {unl / 'x' / 'y' / 'z' / 'truncated.jpg'}" in message
    assert not (tmp_path / "prepared").exists()
    stats = prepare(_cfg(tmp_path, dataset="digits", labels_per_class=30, unlabelled=str(unl), skip_bad="true"))
    unlabelled = stats["unlabelled"]
    assert unlabelled["count"] == 3 and unlabelled["skipped_bad_files"] == 2
    assert sorted(Path(p).name for p in unlabelled["skipped_files"]) == ["corrupt.png", "truncated.jpg"]


def test_unlabelled_settings_are_checked_naming_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.unlabelled = rest .* data.labels_per_class or data.label_fraction"):
        _cfg(tmp_path, dataset="digits", labels_per_class="null", unlabelled="rest")
    with pytest.raises(ConfigError, match="data.unlabelled_max = 0"):
        _cfg(tmp_path, unlabelled_max=0)
    assert _cfg(tmp_path, unlabelled="null").unlabelled == "none"
    with pytest.raises(FileNotFoundError, match="data.unlabelled = .*nowhere.*: no such folder"):
        prepare(_cfg(tmp_path, dataset="digits", unlabelled=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        prepare(_cfg(tmp_path, dataset="digits", unlabelled=str(tmp_path / "empty")))


def test_the_prepare_summary_counts_the_unlabelled_images(tmp_path, capsys) -> None:
    from pipeline.prepare import main

    repo = Path(__file__).resolve().parents[1]
    sets = ["data.dataset=digits", "data.labels_per_class=30", f"data.prepared_dir={tmp_path / 'prepared'}"]
    argv = ["--params", str(repo / "params.yaml"), *(a for s in sets for a in ("--set", s))]
    assert main([*argv, "--set", "data.unlabelled=rest", "--set", "data.unlabelled_max=50"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unlabelled"] == 50
    assert main(argv) == 0
    assert "unlabelled" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_table_of_paths_and_labels_is_a_dataset_and_gives_the_folders_splits(tmp_path) -> None:
    """csv:<file> (path,label[,split]): paths relative to the table; the same images as the image folder they
    list, split the same way; a split column chooses the test rows; the MLflow name is the table's stem."""
    from pipeline.config import load

    root = _folder(tmp_path / "imgs")
    rows = sorted(p.relative_to(tmp_path) for p in root.rglob("*.*"))
    table = tmp_path / "pets.csv"
    label = {p: p.relative_to("imgs").parts[0] for p in rows}  # a nested file belongs to its top-level class
    table.write_text("path,label\n" + "".join(f"{p},{label[p]}\n" for p in rows))
    ours, folder = load_source(f"csv:{table}", image_size=16), load_source(f"imagefolder:{root}", image_size=16)
    assert ours.classes == folder.classes == ["cat", "dog", "owl"]
    for a, b in ((ours.train, folder.train), (ours.test, folder.test)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    split = tmp_path / "split.csv"
    split.write_text(
        "path,label,split\n"
        + "".join(f"{p},{label[p]},{'test' if i % 5 == 0 else 'train'}\n" for i, p in enumerate(rows))
    )
    raw = load_source(f"csv:{split}", image_size=16)
    assert len(raw.test) == len(rows[::5]) and len(raw.train) == len(rows) - len(rows[::5])
    assert load(None, [f"data.dataset=csv:{table}", "data.store_size=96"]).dataset_slug() == "pets"


def test_every_bad_row_of_a_table_is_named_by_its_line(tmp_path) -> None:
    from drtune.sources import BadRowsError

    root = _folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "notes.txt").write_text("not an image")
    good = sorted(p.relative_to(tmp_path) for p in root.rglob("*.*"))
    table = tmp_path / "bad.csv"
    table.write_text(
        "path,label,split\n"
        + "".join(f"{p},{p.parent.name},train\n" for p in good)
        + "imgs/cat/missing.png,cat,train\n"  # line 8
        + "notes.txt,cat,\n"  # line 9
        + f"{good[0]},,test\n"  # line 10
        + f"{good[1]},cat,holdout\n"  # line 11
    )
    with pytest.raises(BadRowsError) as err:
        load_source(f"csv:{table}", image_size=16)
    message = str(err.value)
    assert "4 bad row(s)" in message
    assert "line 8: imgs/cat/missing.png: no such file" in message and "line 9: notes.txt: not an image file" in message
    assert "line 10: label '': empty" in message and "line 11: split 'holdout': train, test or empty" in message
    (tmp_path / "headless.csv").write_text("imgs/cat/0.png,cat\n")
    with pytest.raises(ValueError, match="the header must name the columns path and label"):
        load_source(f"csv:{tmp_path / 'headless.csv'}", image_size=16)
