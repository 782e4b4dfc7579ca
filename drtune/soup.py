"""Model soups (Wortsman et al., ICML 2022): one model whose weights are the average of several models
fine-tuned from the same pretrained weights.

Fine-tuned runs of one backbone from one start tend to land in one basin of the loss, so their
average is itself a good model, often better than any of them, at the cost of one model at
inference. Two recipes:

* **uniform**: the average of every ingredient;
* **greedy**: the ingredients best first; each next one joins the soup only if the soup's score
  (on held-out images: :func:`greedy` takes the scoring function) does not fall. The first ingredient
  alone is the fallback, so a greedy soup never scores below the best single model on those images.

Averaging is over the encoder + head tensors of :mod:`drtune.model_file` files, which hold no frozen
copy and no banks; batch-norm running statistics are averaged like the weights (as the paper does),
and integer counters (``num_batches_tracked``) are taken from the first ingredient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from drtune.model_file import ModelFile, model_bytes, read_model


class SoupError(ValueError):
    """Models that cannot be averaged: another backbone, other classes, other tensors."""


def average(models: list[ModelFile]) -> dict[str, Tensor]:
    """The element-wise mean of ``models``' tensors (float64 sums, each tensor's own dtype back)."""
    first = models[0]
    for m in models[1:]:
        if m.model_name != first.model_name or m.classes != first.classes:
            raise SoupError(
                f"cannot average {m.model_name} ({len(m.classes)} classes) with {first.model_name} "
                f"({len(first.classes)} classes): a soup needs one backbone and one set of classes"
            )
        if m.tensors.keys() != first.tensors.keys():
            raise SoupError(f"the models hold different tensors: {sorted(m.tensors.keys() ^ first.tensors.keys())[:5]}")
    out = {}
    for key, tensor in first.tensors.items():
        if not tensor.is_floating_point():
            out[key] = tensor.clone()  # a counter, not a weight
            continue
        total = torch.zeros_like(tensor, dtype=torch.float64)
        for m in models:
            if m.tensors[key].shape != tensor.shape:
                raise SoupError(f"{key}: shape {tuple(m.tensors[key].shape)} against {tuple(tensor.shape)}")
            total += m.tensors[key].double()
        out[key] = (total / len(models)).to(tensor.dtype)
    return out


def soup(models: list[ModelFile]) -> ModelFile:
    """The averaged model as a model file: the first ingredient's params, classes and history, averaged tensors."""
    first = models[0]
    return read_model(model_bytes(average(models), first.params, first.classes, first.history))


def greedy(models: list[ModelFile], score: Callable[[ModelFile], float]) -> tuple[list[int], list[float], ModelFile]:
    """Greedy soup over ``models`` (best first): (indices of the ingredients kept, the soup's score after each
    model was tried, the soup kept: ``models[0]`` itself when nothing joined). A model joins when the soup
    with it scores at least as high as without it."""
    kept, result = [0], models[0]
    best = score(result)
    trace = [best]
    for i in range(1, len(models)):
        tried = soup([models[j] for j in kept] + [models[i]])
        trace.append(score(tried))
        if trace[-1] >= best:
            kept.append(i)
            best, result = trace[-1], tried
    return kept, trace, result
