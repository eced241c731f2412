"""The optuna sweeper's search space, from Hydra's override syntax or the deprecated `search_space` config.

The mapping is hydra-optuna-sweeper's (MIT; facebookresearch/hydra, plugins/hydra_optuna_sweeper),
written against optuna's FloatDistribution / IntDistribution so it runs on optuna >= 4:

    choice(a, b, ...)               CategoricalDistribution
    range(start, stop[, step])      IntDistribution (float bounds or step: FloatDistribution with step)
    shuffle(range(...))             CategoricalDistribution over the range
    interval(low, high)             FloatDistribution (int bounds: IntDistribution)
    tag(log, interval(low, high))   the same on a log scale
    anything else                   a fixed value, passed to every trial as it is
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def _choices(override: Override) -> list[CategoricalChoiceType]:
    choices: list[CategoricalChoiceType] = []
    for x in override.sweep_iterator(transformer=Transformer.encode):
        if not isinstance(x, (str, int, float, bool, type(None))):
            raise TypeError(
                f"{override.input_line}: a choice is a str, int, float, bool or None, not {type(x).__name__}"
            )
        choices.append(x)
    return choices


def distribution_from_override(override: Override) -> BaseDistribution | str:
    """The distribution of one sweep override, or its value as a string if it is not a sweep."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        return CategoricalDistribution(_choices(override))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep) and value.start is not None and value.stop is not None
        if value.shuffle:
            return CategoricalDistribution(_choices(override))
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(
                float(value.start), float(value.stop), step=float(value.step) if value.step else None
            )
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep) and value.start is not None and value.end is not None
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise NotImplementedError(f"{override.input_line}: this sweep is not supported by the optuna sweeper")


def params_from_overrides(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """`key=value` strings -> (search space, fixed values)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        name = override.get_key_element()
        dist = distribution_from_override(override)
        if isinstance(dist, BaseDistribution):
            space[name] = dist
        else:
            fixed[name] = dist
    return space, fixed


def distribution_from_config(config: Mapping[str, Any]) -> BaseDistribution:
    """One entry of the deprecated `hydra.sweeper.search_space`: {type, low, high, log, step, choices}."""
    kind = config["type"]
    kind = getattr(kind, "name", kind)
    low, high, step, log = config.get("low"), config.get("high"), config.get("step"), bool(config.get("log", False))
    if kind == "categorical":
        return CategoricalDistribution(list(config["choices"]))
    if low is None or high is None:
        raise ValueError(f"search_space type {kind!r} needs low and high, got {dict(config)}")
    if kind == "int":
        if log:
            return IntDistribution(int(low), int(high), log=True)
        return IntDistribution(int(low), int(high), step=int(step) if step is not None else 1)
    if kind == "float":
        if log:
            return FloatDistribution(float(low), float(high), log=True)
        return FloatDistribution(float(low), float(high), step=float(step) if step is not None else None)
    raise NotImplementedError(f"search_space type {kind!r}: expected int, float or categorical")


def grid_choices(name: str, dist: BaseDistribution) -> list[Any]:
    """The points GridSampler visits for one parameter (a discrete distribution only).

    Raises:
        ValueError: a continuous distribution (interval without a step) cannot be a grid.
    """
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, (IntDistribution, FloatDistribution)) and dist.step is not None and not dist.log:
        # The plugin's convention: range(start, stop, step) excludes stop, as Python's range does.
        n = int((dist.high - dist.low) // dist.step)
        return [dist.low + i * dist.step for i in range(n)]
    raise ValueError(f"{name}: the grid sampler needs a discrete search space (choice(...) or range(...)), not {dist}")
