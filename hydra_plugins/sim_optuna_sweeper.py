"""Hydra's entry point to SIM's optuna sweeper (the implementation is sim/experiments/sweeper.py).

SIM ships its own optuna sweeper instead of depending on hydra-optuna-sweeper: that plugin's newest
release pins `optuna<3`, which forces optuna 2.10 and SQLAlchemy 1.x on every environment SIM is
installed in. This module accepts the plugin's config (same groups, keys and search-space syntax) on
optuna >= 4, and adds pruning:

- `hydra/sweeper=optuna`: the plugin's defaults (in-memory study, minimize, 2 trials per batch, stop
  at the first failed batch);
- `hydra/sweeper=sim_optuna`: SIM's defaults (a resumable study in <sweep dir>/optuna.db, maximize,
  one trial at a time, failed trials recorded and the sweep goes on);
- `hydra/sweeper/sampler=tpe|random|cmaes|nsgaii|grid|qmc|gp` as in the plugin (`motpe` is gone
  from optuna 4: TPE handles several objectives);
- `hydra/sweeper/pruner=none|median|hyperband` (or the shorthand `hydra.sweeper.pruner=median`).

Hydra instantiates a sweeper only from a class in the `hydra_plugins` namespace package, and imports
this module on every start: optuna itself is imported only when a sweep starts.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, and dataclasses resolve string annotations through sys.modules.
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

from sim.training.pruners import PRUNERS


class DistributionType(Enum):
    int = 1
    float = 2
    categorical = 3


class Direction(Enum):
    minimize = 1
    maximize = 2


@dataclass
class DistributionConfig:
    """One parameter of the deprecated `hydra.sweeper.search_space` (use `params` instead)."""

    type: DistributionType
    # int and float: the bounds, log scale and an optional step.
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    # categorical: the choices.
    choices: list[Any] | None = None


def motpe_removed(*args: Any, **kwargs: Any) -> NoReturn:
    raise ValueError(
        "hydra/sweeper/sampler=motpe: MOTPESampler was removed in optuna 4; use hydra/sweeper/sampler=tpe, "
        "which optimizes several objectives too"
    )


# ---- samplers: the plugin's configs, with the arguments optuna >= 4 still takes -------------------
@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class GridSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.GridSampler"
    # The grid is built from the search space when the sweep starts.
    _partial_: bool = True
    seed: int | None = None


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    # None leaves optuna's own default: some of these are deprecated in optuna 4 and passing them warns.
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """Needs the `cmaes` package."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    independent_sampler: Any | None = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Any | None = None
    inc_popsize: int = -1
    use_separable_cma: bool = False
    source_trials: Any | None = None


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any | None = None


@dataclass
class MOTPESamplerConfig(SamplerConfig):
    _target_: str = "hydra_plugins.sim_optuna_sweeper.motpe_removed"


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Any | None = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConfig(SamplerConfig):
    """Needs scipy (and torch, which SIM has)."""

    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    independent_sampler: Any | None = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Any | None = None
    warn_independent_sampling: bool = True


# ---- the sweepers -------------------------------------------------------------------------------
@dataclass
class OptunaSweeperConf:
    """The hydra-optuna-sweeper plugin's keys and defaults, plus `pruner`."""

    _target_: str = "hydra_plugins.sim_optuna_sweeper.SimOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    # A pruner config (hydra/sweeper/pruner=median), or its name: none | median | hyperband.
    pruner: Any = MISSING
    # Union[Direction, List[Direction]]: one per value the Hydra main returns.
    direction: Any = Direction.minimize
    # e.g. sqlite:///path/optuna.db; None keeps the study in memory (no resume).
    storage: Any | None = None
    study_name: str | None = None
    n_trials: int = 20
    # Trials launched together (the launcher may run them in parallel).
    n_jobs: int = 2
    # Failed fraction of a batch above which the sweep stops.
    max_failure_rate: float = 0.0
    # Deprecated since Hydra 1.2: {name: DistributionConfig}; `params` is the way.
    search_space: dict[str, Any] | None = None
    # {key: "interval(...)" | "choice(...)" | "range(...)" | "tag(log, interval(...))" | fixed value}
    params: dict[str, str] | None = None
    # An instantiate-style path to a Callable[[DictConfig, optuna.trial.Trial], None] that suggests more.
    custom_search_space: str | None = None


@dataclass
class SimOptunaSweeperConf(OptunaSweeperConf):
    """SIM's defaults for resumable sweeps: a study in <sweep dir>/optuna.db, one trial at a time
    (the basic launcher runs jobs one after another anyway, and the sampler then sees every result
    before it proposes), and failed trials recorded without stopping the sweep."""

    # The Hydra main returns the objective metric(s); every default one (risk_high_recall) is higher-better.
    direction: Any = "maximize"
    storage: Any | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    study_name: str | None = "sim"
    n_jobs: int = 1
    max_failure_rate: float = 1.0


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sim")
_store.store(group="hydra/sweeper", name="sim_optuna", node=SimOptunaSweeperConf, provider="sim")
for _name, _node in {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "motpe": MOTPESamplerConfig,
    "grid": GridSamplerConfig,
    "qmc": QMCSamplerConfig,
    "gp": GPSamplerConfig,
}.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="sim")
for _name, _node in PRUNERS.items():
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="sim")


class SimOptunaSweeper(Sweeper):
    """Hydra's side of the sweeper; sim.experiments.sweeper.OptunaSweeperImpl runs the study."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None,
        custom_search_space: str | None,
        params: DictConfig | None,
        pruner: Any = None,
    ) -> None:
        from sim.experiments.sweeper import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            search_space,
            custom_search_space,
            params,
            pruner,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from sim.core.cli import sweep_fails_cleanly

        # A sweep that cannot go on (its trials failed) ends with one `error:` line, as a run does.
        with sweep_fails_cleanly():
            return self.sweeper.sweep(arguments)
