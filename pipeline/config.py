"""The pipeline's ``params.yaml`` sections (``tune``, ``ray``, ``mlflow``) on top of the library's :class:`Config`.

Validated once, when a stage starts: an unknown key, a value out of range or a search range that
cannot work fails with the field's name before Ray or MLflow start. Cross-field rules live here
too: every queue size must be a multiple of the global batch (``train.batch_size`` ×
``ray.workers_per_trial``), so the bank's FIFO writes stay aligned with the batches that fill it.
A step budget (``train.steps``) becomes epochs only once the prepared training split's size is known:
the stages call :meth:`PipelineConfig.with_steps_resolved` right after loading it, and the checks
that need the epochs (``tune.grace_period``) run then.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator, model_validator

from drtune import methods
from drtune.config import Config, ConfigError, Method, Section, load_config, redact
from drtune.train import epochs_for_steps

# The pretrain stage's output (relative to the project): the backbone baseline and tune start from.
PRETRAINED_WEIGHTS = "models/pretrained/backbone.safetensors"
# model.pretrained / tune.models[i].pretrained values that name no file.
WEIGHT_SOURCES = ("bundled", "hub", "none", "pretrain")


class Range(Section):
    """A log-uniform search range ``[low, high]``."""

    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


def _weights_name(pretrained: str) -> str:
    """A short name for a backbone's weights in its label: the source, or the file's stem made label-safe."""
    return pretrained if pretrained in WEIGHT_SOURCES else re.sub(r"[^\w.\-]", "-", Path(pretrained).stem)


def _default(name: str) -> Range:
    """A knob's default search range, as its method's spec states it (:mod:`drtune.methods`)."""
    knob = methods.knob(name)
    return Range(low=knob.low, high=knob.high)


class BackboneChoice(Section):
    """One backbone the search may choose (``tune.models``): a timm model and the weights it starts from."""

    name: str = Field(description="any timm model name")
    pretrained: str = Field(
        "none",
        description="bundled (offline ImageNet Lite0) | hub | none | pretrain (the pretrain stage's output) | "
        "path to a local checkpoint (it travels to the workers through Ray's object store)",
    )
    label: str | None = Field(
        None, description="its name in the leaderboard and the trials' configs; null: the model name (made unique)"
    )


class TuneConfig(Section):
    num_samples: int | None = Field(
        8, ge=1, le=100_000, description="trials in the search; null: as many as tune.time_budget_s allows"
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        le=365 * 86_400,
        description="wall-clock budget of the search in seconds, across resumes: running trials are stopped when it "
        "runs out and the pick is among those that finished (null: no budget)",
    )
    methods: list[Method] | None = Field(
        None,
        description="null: search train.method alone; a list: one study whose first choice is the method, then "
        "that method's own hyperparameters (every method with the same epochs, early stopping and trial budget). "
        "DR-Tune has not beaten CE-tuning beyond the noise on any backbone measured here (docs/evidence.md, "
        "'DR-Tune's home regime'); it is the one to try when the backbone is self-supervised and CE-tuning falls "
        "below the linear probe. Include ce and linear_probe so the leaderboard shows which wins on your data",
    )
    models: list[BackboneChoice] | None = Field(
        None,
        description="null: every trial fine-tunes model.*; a list of two or more: the search chooses the backbone "
        "first, then the method and its knobs; each keeps its own preprocessing (timm's data config)",
    )
    metric: Literal["top1", "balanced_accuracy", "macro_f1"] = Field(
        "top1",
        description="what chooses: ASHA's rungs, TPE, the pick, the leaderboard and the champion gate all use this "
        "score (validation, then test); balanced_accuracy or macro_f1 when the classes are imbalanced",
    )
    soup: Literal["off", "greedy", "uniform"] = Field(
        "off",
        description="average the picked model with the search's other completed candidates (model soup): greedy adds "
        "one at a time, best first, while validation does not fall; uniform averages them all (pipeline/soups.py)",
    )
    seed: int = Field(0, ge=0, description="seed of Optuna's TPE sampler")
    startup_trials: int = Field(3, ge=1, le=10_000, description="random trials before TPE starts modelling")
    max_concurrent_trials: int = Field(0, ge=0, le=10_000, description="0 = as many as the cluster's resources fit")
    early_stopping: bool = Field(
        True, description="ASHA on (stop weak trials at rungs) or off (every trial runs all epochs)"
    )
    grace_period: int = Field(3, ge=1, le=10_000, description="ASHA: epochs every trial gets before its first rung")
    reduction_factor: float = Field(3.0, gt=1, le=100, description="ASHA: keep the top 1/reduction_factor at each rung")
    revalidate: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: when the best candidates are within the validation noise of each other, re-validate "
        "them on tune.finalist_folds more held-out folds; always: re-validate the top tune.finalists every time; "
        "never: a tie goes to the conservative rule at once (pipeline.selection)",
    )
    finalists: int = Field(3, ge=2, le=100, description="at most this many candidates are re-validated")
    finalist_folds: int = Field(
        2,
        ge=1,
        le=100,
        description="extra held-out folds per finalist, each the validation "
        "split's size, drawn from the training split (at most 1/data.val_fraction − 1)",
    )
    allow_partial: bool = Field(
        False,
        description="false: a search in which any trial failed with an error (a divergence is a result, not an "
        "error) writes nothing and exits non-zero, so the next dvc repro retries those trials; true: pick among "
        "the trials that finished",
    )
    lam: Range = Field(default_factory=lambda: _default("lam"), description="λ, log-uniform")
    queue_sizes: list[int] = Field(
        [256, 512, 1024], min_length=1, description="K choices, multiples of the global batch"
    )
    lr_backbone: Range = Field(
        default_factory=lambda: _default("lr_backbone"), description="real backbone step size, log-uniform"
    )
    lr_head: Range = Field(default_factory=lambda: _default("lr_head"), description="real head step size, log-uniform")
    weight_decay: Range | None = Field(None, description="searched when set, else train.weight_decay")
    l2sp_alpha: Range = Field(
        default_factory=lambda: _default("l2sp_alpha"), description="train.method l2sp: α, log-uniform"
    )
    l2sp_beta: Range = Field(
        default_factory=lambda: _default("l2sp_beta"), description="train.method l2sp: β, log-uniform"
    )
    bss_eta: Range = Field(default_factory=lambda: _default("bss_eta"), description="train.method bss: η, log-uniform")
    points_to_evaluate: list[dict[str, int | float]] = Field(
        default_factory=lambda: [
            {"lam": 1.0, "queue_size": 1024, "lr_backbone": 0.01, "lr_head": 0.1},
            {"lam": 32.0, "queue_size": 1024, "lr_backbone": 0.000303, "lr_head": 0.01},
        ],
        description="trials run first (keys: the method's searched names): the library defaults, then the "
        "reference's effective setting (λ = K/B = 1024/32, backbone 0.01/(1 + 32), head 0.01)",
    )

    @model_validator(mode="after")
    def _a_search_ends(self) -> TuneConfig:
        if self.num_samples is None and self.time_budget_s is None:
            raise ValueError("tune.num_samples is null (no limit) but tune.time_budget_s is not set: give one of them")
        return self

    @field_validator("soup", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare off as false

    @field_validator("models")
    @classmethod
    def _labelled(cls, v: list[BackboneChoice] | None) -> list[BackboneChoice] | None:
        """Give every choice a distinct label: its ``label``, else its model name, else the name and its weights."""
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("list two or more backbones, or leave it null to fine-tune model.* alone")
        names = [c.name for c in v]
        for c in v:
            if c.label is None:
                c.label = c.name if names.count(c.name) == 1 else f"{c.name}/{_weights_name(c.pretrained)}"
        labels = [c.label for c in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two choices share a label ({labels}): give each a distinct label")
        bad = [label for label in labels if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", label)]
        if bad:
            raise ValueError(
                f"labels {bad}: letters, digits, _ . - and one / only (they name MLflow metrics and Ray folders)"
            )
        return v

    @field_validator("methods")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must be null or a non-empty list of distinct methods")
        return v

    @field_validator("queue_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every queue size must be ≥ 1")
        return v


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="null: RAY_ADDRESS (a submitted job's cluster), else a private local Ray, never a head nobody "
        "named; auto: the `ray start` head on this machine; host:port or ray://…",
    )
    num_cpus: int | None = Field(
        None, ge=1, le=100_000, description="private Ray only: CPUs to use (null = this process's CPU affinity)"
    )
    workers_per_trial: int = Field(1, ge=1, le=4096, description="Ray Train data-parallel workers per trial")
    cpus_per_worker: float = Field(2.0, gt=0, le=1024, description="CPUs per Train worker (torch threads follow it)")
    gpus_per_worker: float = Field(
        0.0,
        ge=0,
        le=64,
        description="GPUs per Train worker; > 0 uses nccl and CUDA. A fraction (0.25: four trials share a GPU) or a "
        "whole number; the trials that fit run at once",
    )
    storage_path: str = Field(
        "runs/ray", description="Ray Tune/Train results and checkpoints; shared storage on a cluster"
    )
    max_failures: int = Field(
        1, ge=0, le=100, description="Ray Train: restarts of a trial's workers from its last checkpoint"
    )
    start_timeout_s: int = Field(
        300, ge=10, le=86_400, description="fail a trial whose worker group cannot start in time"
    )

    @model_validator(mode="after")
    def _gpu_shares(self) -> RayConfig:
        g = self.gpus_per_worker
        if g > 1 and g != int(g):
            raise ValueError(
                f"ray.gpus_per_worker = {g:g}: a worker takes a share of one GPU (0 < x ≤ 1, e.g. 0.25 for four "
                "trials on a GPU) or whole GPUs (2, 4, …), not a fraction above one"
            )
        if 0 < g < 1 and self.workers_per_trial > 1:
            raise ValueError(
                f"ray.gpus_per_worker = {g:g} with ray.workers_per_trial = {self.workers_per_trial}: the ranks of one "
                "trial could share a GPU, which NCCL cannot run; use whole GPUs per worker, or one worker per trial"
            )
        return self

    @field_validator("storage_path")
    @classmethod
    def _a_uri_pyarrow_reads(cls, v: str) -> str:
        """A storage URI is read by pyarrow in every stage and on every worker: a malformed one would fail
        minutes later, in Ray. ``s3://`` URIs are parsed here by pyarrow itself (its query options, e.g.
        ``?endpoint_override=host:9000&scheme=http``), offline: a URI without ``region`` or an endpoint
        would make pyarrow ask AWS for the bucket's region, so one is added for the check only."""
        if "://" not in v:
            return v
        split = urlsplit(v)
        if not split.netloc and split.scheme != "file":  # file:///abs/path has no host
            raise ValueError(f"no bucket or host after {split.scheme}://")
        if split.scheme == "s3":
            import pyarrow
            import pyarrow.fs

            query = parse_qs(split.query)
            offline = (
                v
                if {"region", "endpoint_override"} & query.keys()
                else f"{v}{'&' if split.query else '?'}region=us-east-1"
            )
            try:
                pyarrow.fs.FileSystem.from_uri(offline)
            except pyarrow.ArrowInvalid as err:
                raise ValueError(f"not an S3 URI pyarrow reads: {redact(str(err))}") from None  # arrow repeats the URI
        return v


class MLflowConfig(Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="overridden by MLFLOW_TRACKING_URI")
    experiment: str | None = Field(None, description="MLflow experiment; null = drtune-<dataset>")
    registered_model: str | None = Field(None, description="registry name; null = drtune-<dataset>")
    timeout_s: float = Field(10.0, gt=0, le=600, description="how long to wait for a tracking server before failing")


class PipelineConfig(Config):
    """All of ``params.yaml``: the library's sections and the pipeline's."""

    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    mlflow: MLflowConfig = MLflowConfig()

    @model_validator(mode="after")
    def _queue_sizes_divide(self) -> PipelineConfig:
        batch = self.train.batch_size * self.ray.workers_per_trial
        bad = [k for k in self.tune.queue_sizes if k % batch]
        if bad:
            raise ValueError(
                f"tune.queue_sizes {bad} are not multiples of the global batch {batch} "
                f"(train.batch_size {self.train.batch_size} × ray.workers_per_trial {self.ray.workers_per_trial})"
            )
        folds = round(1 / self.data.val_fraction) - 1
        if self.tune.revalidate != "never" and self.tune.finalist_folds > folds:
            raise ValueError(
                f"tune.finalist_folds = {self.tune.finalist_folds}: the training split holds at most "
                f"{folds} folds the size of the validation split (data.val_fraction = {self.data.val_fraction})"
            )
        if self.train.steps is None:  # with a step budget: checked by with_steps_resolved, once the epochs are known
            self._check_grace_period()
        for i, c in enumerate(self.tune.models or []):
            if c.pretrained == "pretrain" and (self.pretrain.method == "none" or c.name != self.model.name):
                raise ValueError(
                    f"tune.models[{i}].pretrained = 'pretrain' names the pretrain stage's output, which needs "
                    f"pretrain.method (now {self.pretrain.method}) and is a {self.model.name} (model.name), "
                    f"not a {c.name}"
                )
        return self

    def _check_grace_period(self) -> None:
        if self.tune.grace_period > self.train.epochs:
            steps = f" (what train.steps = {self.train.steps} makes)" if self.train.steps is not None else ""
            raise ConfigError(
                f"tune.grace_period = {self.tune.grace_period} exceeds train.epochs = {self.train.epochs}{steps}"
            )

    def with_steps_resolved(self, n_train: int) -> PipelineConfig:
        """A copy whose ``train.epochs`` is what ``train.steps`` makes of ``n_train`` training images on
        ``ray.workers_per_trial`` workers (:func:`drtune.train.epochs_for_steps`, the rule ``fit`` applies),
        checked against ``tune.grace_period``; ``self`` unchanged when ``train.steps`` is null."""
        if self.train.steps is None:
            return self
        out = self.model_copy(deep=True)
        out.train.epochs = epochs_for_steps(self, n_train, self.ray.workers_per_trial)
        out._check_grace_period()
        return out

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> PipelineConfig:
        for field, uri in (
            ("ray.storage_path", self.ray.storage_path),
            ("mlflow.tracking_uri", self.mlflow.tracking_uri),
        ):
            if redact(uri) != uri:
                warnings.warn(
                    f"{field} holds credentials ({redact(uri)}): they are kept out of logs, MLflow and the outputs, "
                    "but belong in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)",
                    stacklevel=2,
                )
        return self

    def tune_metric(self) -> str:
        """The result key Tune judges trials by: ``val_`` + ``tune.metric`` (every epoch reports all three)."""
        return f"val_{self.tune.metric}"

    def backbone_weights(self, choice: BackboneChoice) -> str:
        """The ``model.pretrained`` a trial on ``choice`` trains with (``pretrain``: the pretrain stage's file)."""
        return PRETRAINED_WEIGHTS if choice.pretrained == "pretrain" else choice.pretrained

    def backbone(self, label: str) -> BackboneChoice:
        """The ``tune.models`` choice called ``label``."""
        return next(c for c in self.tune.models or [] if c.label == label)

    def default_backbone(self) -> str:
        """The label of ``model.*`` (what the CE baseline and a search without ``tune.models`` fine-tune): the
        ``tune.models`` choice with the same model and weights, else the model's name (with the weights' name
        when a choice of another start has that label)."""
        model = self.library().model
        for c in self.tune.models or []:
            if c.name == model.name and self.backbone_weights(c) == model.pretrained:
                return str(c.label)
        taken = {c.label for c in self.tune.models or []}
        label = model.name if model.name not in taken else f"{model.name}/{_weights_name(model.pretrained)}"
        return label if label not in taken else f"{label}-model"

    def search_methods(self) -> list[str]:
        """The methods the search tries: ``tune.methods``, or ``train.method`` alone."""
        return list(self.tune.methods or [self.train.method])

    def library(self, *, pretrained: bool = True) -> Config:
        """The library's sections alone: the :class:`Config` a training run reads. With ``pretrain.method``
        set, ``model.pretrained`` names the pretrain stage's output, the start of every later run;
        ``pretrained=False`` keeps the configured weights (what the pretrain stage itself starts from)."""
        config = Config.model_validate(self.model_dump(include=set(Config.model_fields)))
        if pretrained and self.pretrain.method != "none":
            config.model.pretrained = PRETRAINED_WEIGHTS
        return config

    def dataset_slug(self) -> str:
        """The dataset's name made safe for MLflow names (``imagefolder:/a/pets`` and ``csv:/a/pets.csv`` → ``pets``)."""
        name = self.data.dataset.split(":", 1)[-1].rstrip("/")
        base = Path(name).stem if self.data.dataset.startswith("csv:") else Path(name).name  # csv:/a/pets.csv → pets
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in base) or "dataset"

    def mlflow_experiment(self) -> str:
        """The MLflow experiment that holds the search's runs and the baseline's."""
        return self.mlflow.experiment or f"drtune-{self.dataset_slug()}"

    def registered_model(self) -> str:
        """The MLflow registered model the winner is registered under."""
        return self.mlflow.registered_model or f"drtune-{self.dataset_slug()}"

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow.tracking_uri


def load(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The validated pipeline configuration; raises :class:`ConfigError` naming the field."""
    config = load_config(path, overrides, schema=PipelineConfig)
    assert isinstance(config, PipelineConfig)
    return config
