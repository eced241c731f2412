"""Hydra's entry point to SIM's grid sweeper (the implementation is sim/experiments/grid_sweeper.py).

`hydra/sweeper=sim_grid` is Hydra's basic sweeper (the product of `hydra.sweeper.params` and the
command line's `key=a,b,c` sweeps, launched in batches by any launcher) with two changes: cells that
cannot work are skipped instead of launched (`skip_if_greater`), and a failed job is recorded while
the others run. Every cell's outcome goes to `<sweep dir>/jobs.jsonl`.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, and dataclasses resolve string annotations through sys.modules.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from sim.core.cli import sweep_fails_cleanly
from sim.experiments.grid_sweeper import GridSweeper


@dataclass
class SimGridSweeperConf:
    _target_: str = "hydra_plugins.sim_grid_sweeper.SimGridSweeper"
    # Jobs handed to the launcher at once (null: the whole grid; a Slurm array of that size).
    max_batch_size: int | None = None
    # {key: "a,b,c"}: the grid, as on the command line.
    params: dict[str, str] | None = None
    # {key_a: key_b}: a cell whose composed config has key_a > key_b is skipped and recorded, not run
    # (model.K: model.F, since K visual tokens are segment means of F frames).
    skip_if_greater: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="sim_grid", node=SimGridSweeperConf, provider="sim")


class SimGridSweeper(GridSweeper):
    """The class Hydra instantiates for hydra/sweeper=sim_grid."""

    def sweep(self, arguments: list[str]) -> Any:
        # Failed jobs end the sweep with one `error:` line, as a failed run does.
        with sweep_fails_cleanly():
            return super().sweep(arguments)
