"""More validation from the same labels: extra held-out folds for re-validating a search's finalists.

A few-label validation split is small (Fashion-MNIST at 60 labels per class keeps 120 images: one
image is 0.8 points), so the trial with the best validation score is often not the best on test.
Re-validating the top trials on other held-out folds of the *same* labelled images lowers that
noise without a single extra label:

    labelled = train ∪ val                   (the prepared splits)
    fold 0   = (train, val)                  the search's own split, already trained
    fold j   = (train − H_j ∪ val, H_j)      j = 1 … F, H_j drawn from train

Each H_j holds, per class, as many images as the validation split does, and the H_j are disjoint
from each other and from val, so every fold trains on as many images as the search did and a
finalist's score over 1 + F folds is its accuracy on (1 + F) × |val| held-out images.
"""

from __future__ import annotations

import numpy as np

from drtune.data import ArraySplit


def max_extra_folds(train: ArraySplit, val: ArraySplit) -> int:
    """How many disjoint extra folds of val's per-class size the training split holds."""
    counts = [(np.sum(train.labels == c), np.sum(val.labels == c)) for c in np.unique(val.labels)]
    return int(min(n_train // n_val for n_train, n_val in counts))


def extra_fold(train: ArraySplit, val: ArraySplit, fold: int, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """Fold ``fold`` (1-based) of the scheme in the module docstring: (its training split, its held-out split).

    Per class the training images are permuted by a generator seeded with (seed, class), as
    :func:`drtune.sources.stratified_take` does, and fold j holds out the j-th block of that
    permutation, the size of the class's validation share; so folds depend only on the seed and
    the data, on any machine. ``fold`` must be at most :func:`max_extra_folds`.
    """
    held = []
    for c in np.unique(val.labels):
        mine = np.flatnonzero(train.labels == c)
        size = int(np.sum(val.labels == c))
        order = np.random.default_rng([seed, int(c)]).permutation(mine)
        held.append(order[(fold - 1) * size : fold * size])
    held_idx = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(train)), held_idx)
    fold_train = ArraySplit(
        np.concatenate([train.images[kept], val.images]), np.concatenate([train.labels[kept], val.labels])
    )
    return fold_train, ArraySplit(train.images[held_idx], train.labels[held_idx])
