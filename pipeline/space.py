"""What a trial searches, without Ray: the searched names, their ranges, starting points, and the
library :class:`~drtune.config.Config` a sampled point becomes.

Each searched name is a :class:`~drtune.methods.Knob` of :mod:`drtune.methods`, which says the
config field it sets. Which names a method has is :func:`searched_names`; its ranges are
``tune.<name>`` (log-uniform; the knob's default range when ``tune`` has no such field) and
``tune.queue_sizes`` (a choice). :mod:`pipeline.search` turns them into Ray Tune and Optuna spaces;
:func:`random_point` draws from the same ranges for code that runs trials without Ray (the
data-scale benchmark's process pool on one GPU box).
"""

from __future__ import annotations

import math
import random

from drtune import methods
from drtune.config import Config, ConfigError
from pipeline.config import PipelineConfig


def field_of(name: str) -> str:
    """The config field a searched name sets (``lam`` → ``drtune.lam``): its :class:`~drtune.methods.Knob`'s."""
    return methods.knob(name).field


def searched_names(config: PipelineConfig, method: str | None = None) -> list[str]:
    """The names ``method`` (default ``train.method``) searches: its spec's (:meth:`MethodSpec.searched`),
    and weight decay when ``tune.weight_decay`` is set and no preset fixes the names.

    Learning rates are real step sizes, so λ never rescales the backbone's rate. A linear probe
    has no backbone rate; L2-SP adds α and β, BSS η, DR-Tune λ and K. Under DR-Tune's
    ``reference`` preset only the authors' base rate and K are free: λ = K/B and the rates follow
    from them (:meth:`Config.resolved`).
    """
    spec = methods.get(method or config.train.method)
    names = list(spec.searched(config))
    if config.tune.weight_decay is not None and spec.preset(config) is None:
        names.append("weight_decay")
    return names


def across_methods(config: PipelineConfig) -> bool:
    """Whether the search chooses the method too (``tune.methods`` lists more than one)."""
    return len(config.search_methods()) > 1


def chooses_backbone(config: PipelineConfig) -> bool:
    """Whether the search chooses the backbone too (``tune.models`` is set)."""
    return config.tune.models is not None


def define_by_run(config: PipelineConfig) -> bool:
    """Whether the space is conditional (:class:`pipeline.searcher.MethodSpace`): the backbone, then the method,
    then that method's names, each called ``<method>.<name>``."""
    return across_methods(config) or chooses_backbone(config)


def starting_points(config: PipelineConfig) -> list[dict]:
    """``tune.points_to_evaluate`` for this method: names it does not search are dropped, names it
    searches but a point leaves out take the config's value; a name :data:`SEARCHED` lacks is an error.

    Across methods every method starts from one point, the config's own values (an equal start for
    each); ``tune.points_to_evaluate`` is for single-method searches. Across backbones (``tune.models``)
    every backbone starts from each of those points, prefixed as :class:`pipeline.searcher.MethodSpace`
    names them."""
    if across_methods(config):
        points = [
            {"method": m, **{f"{m}.{name}": _config_value(config, name) for name in searched_names(config, m)}}
            for m in config.search_methods()
        ]
    else:
        points = _method_points(config)
        if chooses_backbone(config):
            m = config.train.method
            points = [{"method": m, **{f"{m}.{k}": v for k, v in point.items()}} for point in points]
    if not chooses_backbone(config):
        return points
    return [{"backbone": c.label, **point} for c in config.tune.models or [] for point in points]


def checked_starting_points(config: PipelineConfig) -> list[dict]:
    """:func:`starting_points`, refused when ``tune.num_samples`` cannot run them all (every backbone × every
    point or method: some would never be tried)."""
    points = starting_points(config)
    if config.tune.num_samples is not None and len(points) > config.tune.num_samples:
        raise ConfigError(
            f"tune.num_samples = {config.tune.num_samples} is fewer than the search's {len(points)} starting "
            "points (each backbone × each of tune.points_to_evaluate, or × each method): some would never run; "
            "raise it, or list fewer points, methods or models"
        )
    return points


def _method_points(config: PipelineConfig) -> list[dict]:
    """``tune.points_to_evaluate`` for ``train.method``, validated and completed with the config's values."""
    names = searched_names(config)
    points = []
    for i, given in enumerate(config.tune.points_to_evaluate):
        searchable = {k.name for k in methods.all_knobs()}
        unknown = sorted(set(given) - searchable)
        if unknown:
            raise ConfigError(
                f"tune.points_to_evaluate[{i}]: unknown names {unknown} (searchable: {sorted(searchable)})"
            )
        point = {name: given.get(name, _config_value(config, name)) for name in names}
        if "queue_size" in point and int(point["queue_size"]) not in config.tune.queue_sizes:
            raise ConfigError(
                f"tune.points_to_evaluate[{i}].queue_size = {point['queue_size']} is not in "
                f"tune.queue_sizes {config.tune.queue_sizes}"
            )
        points.append(point)
    return points


def _config_value(config: PipelineConfig, name: str) -> float | int:
    section, key = field_of(name).split(".")
    return getattr(getattr(config, section), key)


def trial_config(base: PipelineConfig, sampled: dict) -> Config:
    """One trial's library :class:`Config`: ``base``'s library sections with the sampled values set
    (and the sampled ``method``, when the search spans methods; its names are ``<method>.<name>``; and the
    sampled ``backbone``'s model and weights, when the search spans ``tune.models``)."""
    config = base.library()
    config.train.progress = False
    config.train.method = sampled.get("method", base.train.method)
    if "backbone" in sampled:
        choice = base.backbone(sampled["backbone"])
        config.model.name, config.model.pretrained = choice.name, base.backbone_weights(choice)
    for name, value in unprefixed(sampled).items():
        section, key = field_of(name).split(".")
        setattr(getattr(config, section), key, int(value) if methods.knob(name).choice else float(value))
    return config


def unprefixed(sampled: dict) -> dict:
    """A trial's sampled values under their searched names (``drtune.lam`` → ``lam``), method and backbone left out."""
    return {k.split(".", 1)[1] if "." in k else k: v for k, v in sampled.items() if k not in ("method", "backbone")}


def ranges(config: PipelineConfig, method: str | None = None) -> dict[str, list | tuple[float, float]]:
    """What each of ``method``'s searched names is drawn from: the list ``tune.queue_sizes`` (a
    choice) for ``queue_size``, else the ``(low, high)`` of ``tune.<name>`` (log-uniform), or the
    knob's own default range when ``params.yaml`` has no ``tune.<name>`` (a method added later)."""
    t, out = config.tune, {}
    for name in searched_names(config, method):
        given = getattr(t, name, None)
        k = methods.knob(name)
        out[name] = list(t.queue_sizes) if k.choice else (given.low, given.high) if given else (k.low, k.high)
    return out


def random_point(config: PipelineConfig, rng: random.Random) -> dict:
    """One point of ``train.method``'s space drawn as the search draws it before TPE has data:
    log-uniform in each range of :func:`ranges`, a uniform choice among ``tune.queue_sizes``."""
    return {
        name: rng.choice(drawn)
        if isinstance(drawn, list)
        else math.exp(rng.uniform(math.log(drawn[0]), math.log(drawn[1])))
        for name, drawn in ranges(config).items()
    }


def largest_runs(config: PipelineConfig) -> list[tuple[str, Config]]:
    """(where its backbone is set, the largest run on it): per backbone the search may train (``model`` alone,
    or each of ``tune.models``), its config with the largest queue size, for the checks before Ray starts."""
    labels = [None] if not chooses_backbone(config) else [c.label for c in config.tune.models or []]
    out = []
    for i, label in enumerate(labels):
        run = trial_config(config, {} if label is None else {"backbone": label})
        run.drtune.queue_size = max(config.tune.queue_sizes)
        out.append(("model" if label is None else f"tune.models[{i}]", run))
    return out
