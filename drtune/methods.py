"""The fine-tuning methods, one spec each: the only place a method's name decides anything.

A :class:`MethodSpec` says what a method keeps (a frozen copy of the pretrained encoder, a
feature bank), whether the backbone trains, which hyperparameters ("knobs") it adds to the
search and over which default ranges, and its objective: ``loss(task, features, logits, y)``
returns ``(total, CE, regulariser)`` in float32 (:meth:`drtune.task.FineTuneTask.train_step`
calls it once per step). Every consumer reads the spec: the task, the preflight's checkpoint
size, the configuration's validation, the search space, the leaderboard and the model card.

Adding a method is one :func:`register` call with its spec (and its tests)::

    register(MethodSpec("ce_wd", "CE + head decay", "CE-tuning with a decayed head",
                        knobs=(Knob("l2sp_beta", "baselines.l2sp_beta", 1e-4, 1.0),), loss=my_loss))

A knob's ``field`` is the :class:`~drtune.config.Config` field it sets (a new hyperparameter gets
its field in ``drtune/config.py``'s ``baselines`` section). Specs travel to Ray workers by value
with the trial (:func:`adopt`), so a method registered in a driver or a notebook trains there too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from drtune.objectives import bss_penalty, dr_tune_loss, l2sp_penalty

if TYPE_CHECKING:
    from drtune.config import Config
    from drtune.task import FineTuneTask

Loss = Callable[["FineTuneTask", Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Knob:
    """A searched hyperparameter: its search name, the config field it sets, its default log-uniform
    range ``[low, high]`` (``tune.<name>`` in ``params.yaml`` overrides it where that field exists) or,
    for ``choice``, the values the search chooses among (``tune.queue_sizes`` for K)."""

    name: str
    field: str
    low: float = 0.0
    high: float = 0.0
    choice: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method (see the module docstring)."""

    name: str
    display: str  # short name for tables and plots
    long_name: str  # what a model card says
    loss: Loss
    knobs: tuple[Knob, ...] = ()
    frozen_copy: bool = False  # keeps f_p, a frozen copy of the pretrained encoder (DR-Tune's f_p, L2-SP's w₀)
    feature_bank: bool = False  # keeps DR-Tune's two K × D banks, filled before the first step
    trains_backbone: bool = True  # False: only the head learns (no backbone learning rate)
    # Optional: the knobs that stay free under a preset (``None``: all of them); see DR-Tune's.
    preset_knobs: Callable[[Config], tuple[str, ...] | None] | None = None
    # Optional: turn a preset into the numbers the loop uses (``Config.resolved`` calls it).
    resolve: Callable[[Config, int], None] | None = None

    def preset(self, config: Config) -> tuple[str, ...] | None:
        """The names a preset in ``config`` leaves free, or None when no preset applies."""
        return self.preset_knobs(config) if self.preset_knobs else None

    def searched(self, config: Config) -> tuple[str, ...]:
        """The names a search over this method draws: the head's rate, the backbone's when it trains, the knobs."""
        preset = self.preset(config)
        if preset is not None:
            return preset
        rates = ("lr_head", "lr_backbone") if self.trains_backbone else ("lr_head",)
        return rates + tuple(k.name for k in self.knobs)


# The knobs every method shares: the two learning rates (real step sizes) and, when searched, weight decay.
COMMON_KNOBS = (
    Knob("lr_backbone", "train.lr_backbone", 1e-4, 3e-2),
    Knob("lr_head", "train.lr_head", 3e-3, 0.3),
    Knob("weight_decay", "train.weight_decay", 1e-6, 1e-2),
)


def _cross_entropy(task: FineTuneTask, features: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ce = F.cross_entropy(logits, y)
    return ce, ce, torch.zeros((), device=ce.device)


def _dr_tune(task: FineTuneTask, features: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 14: CE on the batch + λ · CE of the head on the calibrated bank (``drtune.dr: false``: CE alone)."""
    if not task.config.drtune.dr:
        return _cross_entropy(task, features, logits, y)
    calibrated = task.calibrated_bank(features)
    return dr_tune_loss(logits, y, task.model.head(calibrated), task.bank.labels, task.config.drtune.lam)


def _l2sp(task: FineTuneTask, features: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, ce = task.config.baselines, F.cross_entropy(logits, y)
    reg = l2sp_penalty(
        task.model.encoder.parameters(), task.frozen.parameters(), [task.model.head.weight], b.l2sp_alpha, b.l2sp_beta
    )
    return ce + reg, ce, reg


def _bss(task: FineTuneTask, features: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ce = F.cross_entropy(logits, y)
    reg = bss_penalty(features, task.config.baselines.bss_eta, task.config.baselines.bss_k)
    return ce + reg, ce, reg


def _reference_knobs(config: Config) -> tuple[str, ...] | None:
    """Under DR-Tune's ``reference`` preset only the authors' base rate and K are free (λ = K/B)."""
    return ("lr_backbone", "queue_size") if config.drtune.preset == "reference" else None


def _resolve_reference(config: Config, world_size: int) -> None:
    """The ``reference`` preset: the authors' step in real step sizes (see :meth:`drtune.config.Config.resolved`
    for the algebra) and their rotation schedule, every ``rotation_every``-th batch of each epoch."""
    if config.drtune.preset != "reference":
        return
    lam = config.drtune.queue_size / (config.train.batch_size * world_size)
    base = config.train.lr_backbone
    config.drtune.lam = lam
    config.drtune.preset = "custom"
    config.train.lr_backbone = base / (1 + lam)
    config.train.lr_head = base
    config.train.weight_decay = config.train.weight_decay * (1 + lam)
    config.drtune.rotation_schedule = "epoch"


METHODS: dict[str, MethodSpec] = {}
PLAIN = "ce"  # plain fine-tuning: what the baseline stage runs, the reference every comparison is against
PROPOSED = "drtune"  # the method this project reproduces: its lift over the best other method is reported


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known by its name (replacing one of the same name); returns it."""
    if not spec.name.isidentifier():
        raise ValueError(f"method name {spec.name!r} must be an identifier (letters, digits, _)")
    METHODS[spec.name] = spec
    return spec


def adopt(specs: list[MethodSpec]) -> None:
    """Register the specs a trial carries that this process does not know yet (a Ray worker's side)."""
    for spec in specs:
        METHODS.setdefault(spec.name, spec)


def get(name: str) -> MethodSpec:
    """The spec of ``name``; a ``ValueError`` listing the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def names() -> list[str]:
    """The registered methods, in registration order."""
    return list(METHODS)


def all_knobs() -> tuple[Knob, ...]:
    """Every searchable knob: the common ones, then each registered method's."""
    return COMMON_KNOBS + tuple(k for spec in METHODS.values() for k in spec.knobs)


def knob(name: str) -> Knob:
    """The knob called ``name``, common or of any registered method."""
    for k in all_knobs():
        if k.name == name:
            return k
    raise ValueError(f"unknown hyperparameter {name!r}")


register(
    MethodSpec(
        "drtune",
        "DR-Tune",
        "DR-Tune (distribution regularisation + semantic calibration)",
        _dr_tune,
        knobs=(Knob("lam", "drtune.lam", 0.1, 40.0), Knob("queue_size", "drtune.queue_size", choice=True)),
        frozen_copy=True,
        feature_bank=True,
        preset_knobs=_reference_knobs,
        resolve=_resolve_reference,
    )
)
register(MethodSpec("ce", "CE-tuning", "CE-tuning", _cross_entropy))
register(MethodSpec("linear_probe", "linear probe", "linear probe", _cross_entropy, trains_backbone=False))
register(
    MethodSpec(
        "l2sp",
        "L2-SP",
        "L2-SP",
        _l2sp,
        frozen_copy=True,
        knobs=(
            Knob("l2sp_alpha", "baselines.l2sp_alpha", 1e-4, 1.0),
            Knob("l2sp_beta", "baselines.l2sp_beta", 1e-4, 1.0),
        ),
    )
)
register(MethodSpec("bss", "BSS", "BSS", _bss, knobs=(Knob("bss_eta", "baselines.bss_eta", 1e-4, 0.1),)))
