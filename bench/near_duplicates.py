"""Where should a near copy start? Thumbnail correlations of real pairs against planted copies.

    python bench/near_duplicates.py                      # params.yaml's data (Fashion-MNIST, 60 labels per class)
    python bench/near_duplicates.py --set data.dataset=digits

Two tables, from one run of drtune.data_checks' thumbnails:
1. the prepared splits as they are: how many pairs, and how many test images with a training or
   validation partner, reach each correlation (distinct images of one kind: false near copies);
2. copies of 200 training images made as a scraper or a pipeline makes them (JPEG re-encoding,
   brightness, down- and up-scaling, a one-pixel shift): the lowest and the 10th-percentile
   correlation of each copy with its original (true near copies).
The threshold in drtune.data_checks (NEAR_CORRELATION) should sit above table 1's bulk and below
table 2's. Writes bench/results/near_duplicates.json.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from drtune.config import load_config
from drtune.data_checks import NEAR_CORRELATION, grey_thumbnails
from drtune.sources import load_splits

THRESHOLDS = (0.97, 0.98, 0.99, 0.995, 0.999)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
    out = np.asarray(Image.open(buffer))
    return out[..., None] if out.ndim == 2 else out


def _rescaled(image: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((pil.width * 3 // 4, pil.height * 3 // 4)).resize(pil.size))
    return out[..., None] if out.ndim == 2 else out


COPIES = {
    "JPEG quality 90": lambda x: _jpeg(x, 90),
    "JPEG quality 75": lambda x: _jpeg(x, 75),
    "JPEG quality 30": lambda x: _jpeg(x, 30),
    "brightness +20": lambda x: np.clip(x.astype(int) + 20, 0, 255).astype(np.uint8),
    "scaled to 3/4 and back": _rescaled,
    "shifted one pixel": lambda x: np.roll(x, 1, axis=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.set).data
    _, (train, val, test) = load_splits(cfg)
    labelled = np.concatenate([train.images, val.images])
    thumbs = grey_thumbnails(np.concatenate([labelled, test.images]))
    n = len(labelled)
    pairs = {t: 0 for t in THRESHOLDS}
    for start in range(0, len(thumbs), 2048):
        correlation = thumbs[start : start + 2048] @ thumbs[start:].T
        upper = np.triu(np.ones_like(correlation, dtype=bool), k=1)
        for t in THRESHOLDS:
            pairs[t] += int(((correlation >= t) & upper).sum())
    test_best = (thumbs[n:] @ thumbs[:n].T).max(axis=1)
    real = [
        {"at_least": t, "pairs": pairs[t], "test_images_with_a_partner": int((test_best >= t).sum())}
        for t in THRESHOLDS
    ]

    originals = train.images[:200]
    planted = []
    for name, copy in COPIES.items():
        a, b = grey_thumbnails(originals), grey_thumbnails(np.stack([copy(x) for x in originals]))
        c = (a * b).sum(axis=1)
        planted.append({"copy": name, "lowest": float(c.min()), "p10": float(np.percentile(c, 10))})

    print(f"{cfg.dataset}: {len(train)} train, {len(val)} val, {len(test)} test images; threshold {NEAR_CORRELATION}")
    print(f"\n{'correlation ≥':>14} {'pairs':>7} {'test images':>12}")
    for row in real:
        print(f"{row['at_least']:>14} {row['pairs']:>7} {row['test_images_with_a_partner']:>12}")
    print(f"\n{'planted copy':<24} {'lowest':>8} {'10th pct':>9}")
    for row in planted:
        print(f"{row['copy']:<24} {row['lowest']:>8.4f} {row['p10']:>9.4f}")
    out = Path("bench/results/near_duplicates.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"dataset": cfg.dataset, "threshold": NEAR_CORRELATION, "real": real, "planted": planted}, indent=1)
    )


if __name__ == "__main__":
    main()
