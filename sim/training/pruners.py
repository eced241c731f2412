"""The pruners of SIM's optuna sweeper (`hydra/sweeper/pruner=none|median|hyperband`, or the shorthand
`hydra.sweeper.pruner=median`): their configs and the pruner a config names.

A pruner stops a trial whose val metric lags the others' at the same epoch (sim/training/pruning.py
reports each epoch from inside the run). Hydra's plugin scan imports this module on every start
(hydra_plugins/sim_optuna_sweeper.py registers the configs): optuna is imported only to build a pruner.
"""

# No `from __future__ import annotations`: OmegaConf reads these dataclasses' field types.
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING, DictConfig, OmegaConf

from sim.core.errors import ConfigError

if TYPE_CHECKING:
    import optuna


@dataclass
class PrunerConfig:
    _target_: str = MISSING


@dataclass
class NopPrunerConfig(PrunerConfig):
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig(PrunerConfig):
    """Prune when the trial's value at an epoch is worse than the median of earlier trials there."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that finish unpruned before any is compared
    n_warmup_steps: int = 0  # the first epoch a trial may be pruned at (steps are epoch numbers, from 1)
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig(PrunerConfig):
    """Successive halving in brackets; a resource is one epoch (`max_resource: auto` = the first
    finished trial's epochs)."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


PRUNERS: dict[str, Any] = {"none": NopPrunerConfig, "median": MedianPrunerConfig, "hyperband": HyperbandPrunerConfig}


def make_pruner(spec: Any) -> "optuna.pruners.BasePruner":
    """An optuna pruner from `hydra.sweeper.pruner`: a name (none, median, hyperband), a config with
    `_target_`, or a pruner Hydra has already built.

    Raises:
        ConfigError: an unknown name or a config that is not a pruner.
    """
    import optuna
    from hydra.utils import instantiate

    if spec is None:
        return optuna.pruners.NopPruner()
    if isinstance(spec, str):
        if spec.lower() not in PRUNERS:
            raise ConfigError(
                f"hydra.sweeper.pruner={spec}: expected one of {', '.join(PRUNERS)} "
                "(or hydra/sweeper/pruner=NAME to set its options)"
            )
        spec = OmegaConf.structured(PRUNERS[spec.lower()])
    if isinstance(spec, (dict, DictConfig)):
        spec = instantiate(spec)
    if not isinstance(spec, optuna.pruners.BasePruner):
        raise ConfigError(f"hydra.sweeper.pruner: {spec!r} is not an optuna pruner")
    return spec


def prunes(pruner: "optuna.pruners.BasePruner") -> bool:
    """False for optuna's NopPruner (the sweep prunes nothing)."""
    import optuna

    return not isinstance(pruner, optuna.pruners.NopPruner)
