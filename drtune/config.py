"""Validated configuration: the ``params.yaml`` sections the library reads, checked once at the edge.

One object, :class:`Config`, travels from ``params.yaml`` to the task: the CLI, the pipeline's
stages and every Ray worker hand the same validated object along (Ray pickles it as it is).
Every field has its default and its range here, and only here; ``params.yaml`` states the same
values with comments (a test keeps the two equal). A bad value or an unknown key fails before
any compute with a message naming the field (``train.epochs = 0: Input should be greater than or
equal to 1``, ``train.epocs: Extra inputs are not permitted``). Deep code trusts these objects.

:meth:`Config.resolved` is the one place the ``reference`` preset is interpreted: it turns the
user's choices into the numbers the loop uses, and the resolved config written next to the
outputs says exactly what ran.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drtune import methods


def _known_method(name: str) -> str:
    methods.get(name)  # a ValueError naming the known methods
    return name


Method = Annotated[str, AfterValidator(_known_method)]  # a name of drtune.methods' registry


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


class Section(BaseModel):
    """A ``params.yaml`` section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: str = Field(
        "fashion-mnist",
        description="digits | fashion-mnist | imagefolder:<path> | csv:<file> (path,label[,split]) | a torchvision name",
    )
    root: str = Field("data/raw", description="where raw dataset files are looked for")
    prepared_dir: str = Field("data/prepared", description="output of the prepare stage")
    labels_per_class: int | None = Field(60, ge=1, description="few-label setting: training images kept per class")
    label_fraction: float | None = Field(None, gt=0, le=1, description="alternative: fraction of labels kept per class")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the kept training images held out for validation"
    )
    seed: int = Field(0, ge=0, description="seed of the subsampling and of the validation split")
    skip_bad: bool = Field(False, description="skip unreadable images (counted in stats.json) instead of failing")
    download: bool = Field(True, description="download a missing fashion-mnist / torchvision dataset when online")
    store_size: int = Field(
        96, ge=8, le=1024, description="image folders: stored side length (shorter side, centre crop)"
    )
    unlabelled: str = Field(
        "none",
        description="none | rest (the training images beyond the label budget, labels dropped) | a folder of "
        "images (any nesting); prepare writes them as unlabelled.npz, never a validation or test image",
    )
    unlabelled_max: int | None = Field(
        None, ge=1, description="at most this many unlabelled images (a seeded sample): bounds memory for big folders"
    )
    max_leakage: float = Field(
        0.0,
        ge=0,
        le=1,
        description="largest share of test images that may be copies of training or validation images; above it "
        "prepare stops and names them (drtune.data_checks)",
    )
    near_copies_leak: bool = Field(
        False,
        description="count near copies (thumbnail correlation ≥ 0.995) of training or validation images in the test "
        "split as leakage too; by default they are reported, not refused",
    )

    @field_validator("unlabelled", mode="before")
    @classmethod
    def _unlabelled_none(cls, v: Any) -> Any:
        if v is None:  # YAML null reads as none
            return "none"
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be none, rest or a folder of images")
        return v

    @model_validator(mode="after")
    def _one_label_budget(self) -> DataConfig:
        if self.labels_per_class is not None and self.label_fraction is not None:
            raise ValueError("set only one of data.labels_per_class and data.label_fraction (the other to null)")
        if self.unlabelled == "rest" and (
            (self.labels_per_class is None and self.label_fraction is None) or self.label_fraction == 1
        ):
            raise ValueError(
                "data.unlabelled = rest keeps the training images beyond the label budget: set "
                "data.labels_per_class or data.label_fraction (below 1), or the rest is empty"
            )
        return self


class ModelConfig(Section):
    name: str = Field("tf_efficientnet_lite0", description="any timm model name")
    pretrained: str = Field("bundled", description="bundled | hub | none | path to a checkpoint")


class TrainConfig(Section):
    method: Method = "drtune"
    epochs: int = Field(10, ge=1, le=10_000, description="passes over the training split (unless train.steps is set)")
    steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="a budget of optimiser steps instead of train.epochs: the run trains ceil(steps / steps per "
        "epoch) epochs (drtune.train.epochs_for_steps); null: train.epochs",
    )
    batch_size: int = Field(32, ge=2, le=65_536, description="per worker; the global batch is this × workers")
    image_size: int = Field(64, ge=16, le=1024)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr_backbone: float = Field(0.01, gt=0, le=10, description="real step size of the encoder")
    lr_head: float = Field(0.1, gt=0, le=100, description="real step size of the linear head")
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="data-loader processes per training worker; auto: none on the CPU (the step needs "
        "the cores), on CUDA one per CPU thread the process was given, at most 12",
    )
    augment_on: Literal["auto", "loader", "device"] = Field(
        "auto",
        description="where training images are cropped and flipped: loader (CPU processes), device "
        "(the split in GPU memory, whole batches at once); auto: device on CUDA when the split fits in 2 GiB",
    )
    bf16: bool = Field(True, description="bf16 autocast and channels_last on CUDA (ignored on CPU)")
    progress: bool = True
    checkpoint_every: int = Field(
        1, ge=1, le=10_000, description="epochs between resumable checkpoints (last.pt); the last epoch is always saved"
    )
    validate_every: int = Field(
        1,
        ge=1,
        le=10_000,
        description="epochs between validations (and reports); the last epoch, and in a search ASHA's rung epochs, "
        "are always validated",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers_in_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError("must be auto or 0 … 64")
        return v


class DRTuneConfig(Section):
    preset: Literal["custom", "reference"] = Field(
        "custom",
        description="reference: λ = K/B, the authors' learning rates converted exactly, and their rotation "
        "schedule (rotation_schedule = epoch)",
    )
    lam: float = Field(1.0, ge=0, le=1e4, description="λ of Eq. 14, the weight of R_DR")
    queue_size: int = Field(1024, ge=1, le=1_000_000, description="K, bank slots (any K; writes wrap)")
    dr: bool = True
    sc: bool = True
    rotate: bool = True
    translate: bool = True
    confidence: bool = True
    rotation_every: int = Field(10, ge=0, le=1_000_000, description="0 = never rotate")
    rotation_between: Literal["skip", "reuse"] = "skip"
    rotation_timing: Literal["now", "overlapped"] = Field(
        "now",
        description="now: a rotation is computed at the step that first applies it; overlapped: from a copy of the "
        "step's banks after its update (on CUDA on a side stream, alongside the backward pass) and applied from the "
        "next step on, one step stale (needs rotation_between = reuse)",
    )
    rotation_schedule: Literal["global", "epoch"] = Field(
        "global",
        description="global: rotate when the run's step count is a multiple of rotation_every; epoch: when the "
        "batch index within the epoch is (the reference code's rule)",
    )
    pretrained_features: Literal["online", "cached"] = Field(
        "online",
        description="online: the frozen encoder sees each augmented batch (the paper); cached: "
        "features of the un-augmented training images, computed once (no extra forward pass per step)",
    )

    @model_validator(mode="after")
    def _overlapped_rotation_is_reused(self) -> DRTuneConfig:
        if self.rotation_timing == "overlapped" and self.rotation_between != "reuse":
            raise ValueError(
                f"drtune.rotation_timing = overlapped needs drtune.rotation_between = reuse, not "
                f"{self.rotation_between}: a rotation is applied from the step after the one that computes it, so "
                "every step applies the last one computed"
            )
        return self


class BaselinesConfig(Section):
    l2sp_alpha: float = Field(0.01, ge=0, le=100)
    l2sp_beta: float = Field(0.01, ge=0, le=100)
    bss_eta: float = Field(0.001, ge=0, le=100)
    bss_k: int = Field(1, ge=1, le=64)


class PretrainConfig(Section):
    """Self-supervised continued pretraining of the backbone on unlabelled images (:mod:`drtune.pretrain`)."""

    method: Literal["none", "moco", "simclr"] = Field(
        "none", description="none: the backbone as configured; moco (v2) | simclr: trained on data.unlabelled first"
    )
    init: Literal["weights", "scratch"] = Field(
        "weights", description="weights: continue from model.pretrained; scratch: from a random initialisation"
    )
    epochs: int = Field(10, ge=1, le=10_000, description="passes over the unlabelled split")
    batch_size: int = Field(
        64, ge=2, le=65_536, description="images per worker and step, each seen as two views (≥ 2: negatives)"
    )
    lr: float = Field(0.03, gt=0, le=10, description="SGD-Nesterov step size, cosine to 0 (MoCo v2: 0.03 at batch 256)")
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    temperature: float | None = Field(
        None, gt=0, le=10, description="InfoNCE temperature; null: the method's own (MoCo v2 0.2, SimCLR 0.5)"
    )
    queue_size: int = Field(4096, ge=1, le=1_000_000, description="MoCo: negatives kept from earlier batches")
    ema: float = Field(0.99, ge=0, lt=1, description="MoCo: momentum of the key encoder")
    projection_dim: int = Field(128, ge=8, le=8192, description="output of the projection head (both papers: 128)")
    knn_k: int = Field(20, ge=1, le=1000, description="neighbours of the kNN monitor on the labelled validation split")
    checkpoint_every: int = Field(
        1, ge=1, le=10_000, description="epochs between checkpoints (the last is always saved)"
    )
    seed: int = Field(0, ge=0)


class Config(Section):
    """Everything one fine-tuning run reads: the library's sections of ``params.yaml``."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    drtune: DRTuneConfig = DRTuneConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _stored_images_are_large_enough(self) -> Config:
        if self.data.dataset.startswith(("imagefolder:", "csv:")) and self.data.store_size < self.train.image_size:
            raise ValueError(
                f"data.store_size = {self.data.store_size} is smaller than train.image_size = "
                f"{self.train.image_size}: the stored images would be upsampled; raise data.store_size"
            )
        return self

    def resolved(self, world_size: int = 1) -> Config:
        """A copy with the ``reference`` preset applied; the one place that preset is interpreted.

        The reference's loss is ``(L_CE + λ R_DR)/(1 + λ)`` with ``λ = K/B`` (B the global batch),
        backbone rate ``r``, head rate ``r (1 + K/B)`` and weight decay ``wd``. For SGD (momentum and
        Nesterov included) dividing the gradient by ``1 + λ`` is the same as dividing both rates by
        ``1 + λ`` and multiplying the weight decay by ``1 + λ``, so with ``train.lr_backbone = r``
        and ``train.weight_decay = wd`` read as the reference's values the preset sets
        ``lr_backbone = r/(1+λ)``, ``lr_head = r`` and ``weight_decay = wd (1+λ)``. It also takes the
        reference's rotation schedule (``drtune.rotation_schedule = epoch``: every ``rotation_every``-th
        batch of each epoch) and sets ``preset = custom`` (the resolved numbers are the real ones;
        resolving twice changes nothing). :meth:`preset_changes` lists what it changed.
        """
        out = self.model_copy(deep=True)
        spec = methods.get(out.train.method)
        if spec.resolve is not None:  # DR-Tune's: drtune.methods._resolve_reference
            spec.resolve(out, world_size)
        return out

    def preset_changes(self, world_size: int = 1) -> dict[str, tuple[Any, Any]]:
        """The settings :meth:`resolved` changes, ``{"train.lr_head": (0.1, 0.01), …}`` (:func:`changed_settings`);
        empty when no preset applies. The preset's own field, which reads ``custom`` once applied, is left out."""
        changes = changed_settings(self, self.resolved(world_size))
        changes.pop("drtune.preset", None)
        return changes


def changed_settings(before: Config, after: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (value in before, value in after)}`` for every setting that differs, in the schema's order."""
    old, new = before.model_dump(mode="json"), after.model_dump(mode="json")
    return {
        f"{section}.{key}": (value, new[section][key])
        for section, values in old.items()
        for key, value in values.items()
        if new[section][key] != value
    }


# user:password@ (or key:secret@) inside a URI: s3://KEY:SECRET@bucket/runs, https://user:token@host. Up to the
# first @, "/" included: an AWS secret may hold an unescaped "/" (hiding too much beats leaking a secret).
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)[^@\s]*@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***`` (what is logged, printed or written)."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {(redact(value) if isinstance(value, str) else value)!r}"
        lines.append(f"{field}{shown}: {e['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type[Config] = Config
) -> Config:
    """Read ``params.yaml`` (or the schema's defaults), apply ``section.key=value`` overrides, validate.

    Every key of an override and of a section ``schema`` knows must be valid. Top-level sections of
    the *file* that ``schema`` does not know (the pipeline's ``tune``, ``ray``, ``mlflow`` when the
    library reads ``params.yaml`` alone) are left out, with a one-line note naming them.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected sections (a mapping), got {type(tree).__name__}")
        foreign = sorted(set(tree) - set(schema.model_fields))
        if foreign:
            print(f"note: {path}: sections {', '.join(foreign)} are not read here", file=sys.stderr)
            tree = {k: v for k, v in tree.items() if k in schema.model_fields}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved configuration next to the outputs (the timm ``args.yaml`` habit)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
