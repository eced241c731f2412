"""Hydra's entry point to SIM's resumable optuna sweeper (the implementation is sim/experiments/sweeper.py).

Hydra instantiates a sweeper only from a class in the `hydra_plugins` namespace package, so this
module holds the class Hydra sees and the config node `hydra/sweeper=sim_optuna`. Plugin discovery
imports this module on every Hydra start: the optuna-heavy implementation is imported only when a
sweep actually starts.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, and dataclasses resolve string annotations through sys.modules.
from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


@dataclass
class SimOptunaSweeperConf(OptunaSweeperConf):
    """The plugin's settings with defaults for resumable sweeps: a study in <sweep dir>/optuna.db,
    one trial at a time (the basic launcher runs jobs one after another anyway, and the sampler then
    sees every result before it proposes), and failed trials recorded without stopping the sweep."""

    _target_: str = "hydra_plugins.sim_optuna_sweeper.SimOptunaSweeper"
    # The Hydra main returns the objective metric(s); every default one (risk_high_recall) is higher-better.
    direction: Any = "maximize"
    storage: Optional[Any] = "sqlite:///${hydra.sweep.dir}/optuna.db"
    study_name: Optional[str] = "sim"
    n_jobs: int = 1
    max_failure_rate: float = 1.0


ConfigStore.instance().store(group="hydra/sweeper", name="sim_optuna", node=SimOptunaSweeperConf, provider="sim")


class SimOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's OptunaSweeper running sim.experiments.sweeper.ResumableOptunaSweeperImpl."""

    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: Optional[Any],
                 custom_search_space: Optional[str], params: Optional[Any]) -> None:
        from sim.experiments.sweeper import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs,
                                                  max_failure_rate, search_space, custom_search_space, params)

    def sweep(self, arguments: List[str]) -> None:
        from sim.core.cli import sweep_fails_cleanly

        with sweep_fails_cleanly():
            return super().sweep(arguments)
