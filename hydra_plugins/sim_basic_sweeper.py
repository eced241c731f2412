"""Hydra's basic sweeper (`python train.py -m a=1,2 b=x,y`), ending a sweep with failed jobs in one line.

Hydra's own BasicSweeper ends such a sweep with the first failed job's traceback. This one runs the
same jobs in the same batches and, like it, stops after a batch with a failed job, exit status 1;
but it says `error: all N trials failed; the first, ..., with <its error> (its log: ...)` instead:
each job's traceback is in its own logs/stdout.log. Config `hydra/sweeper=sim_basic`; train.py also
runs it as `basic`, Hydra's default (`use_as_basic`).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf


@dataclass
class SimBasicSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.sim_basic_sweeper.SimBasicSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="sim_basic", node=SimBasicSweeperConf, provider="sim")


def use_as_basic() -> None:
    """Make `hydra/sweeper=basic`, the sweeper of `-m` unless a config picks another, this one, in this
    process only (other Hydra apps keep Hydra's).

    Not an `override hydra/sweeper` in train.yaml: the first override of a group wins, so it would
    silence the ones in sweeps/*.yaml.
    """
    from hydra.core.plugins import Plugins

    # Hydra's plugin scan (once per process) re-runs each plugin module, storing its own `basic` again.
    Plugins.instance()
    ConfigStore.instance().store(group="hydra/sweeper", name="basic", node=SimBasicSweeperConf, provider="sim")


class SimBasicSweeper(BasicSweeper):
    """BasicSweeper whose failed jobs end the sweep with one `error:` line (see the module doc)."""

    def sweep(self, arguments: list[str]) -> Any:
        from sim.core.cli import sweep_fails_cleanly

        with sweep_fails_cleanly():
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(
            parser.parse_overrides([*self._parse_config(), *arguments]), self.max_batch_size
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[Sequence[JobReturn]] = []
        n_launched = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=n_launched)
            n_launched += len(batch)
            returns.append(results)
            failed = [r for r in results if r.status == JobStatus.FAILED]
            if failed:
                raise _sweep_failed(failed, n_launched)
        return returns


def _sweep_failed(failed: list[JobReturn], n_launched: int) -> Exception:
    from sim.core.cli import describe_error, failed_trials_message
    from sim.core.errors import SweepFailed

    first = failed[0]
    run_dir = first.hydra_cfg.hydra.runtime.output_dir if first.hydra_cfg is not None else None
    num = first.hydra_cfg.hydra.job.num if first.hydra_cfg is not None else "?"
    # Read directly: `return_value` re-raises the job's exception after writing Hydra's own line to stderr.
    error = describe_error(first._return_value)
    name = f"trial {num} ({' '.join(first.overrides or [])})"
    return SweepFailed(failed_trials_message(len(failed), n_launched, name, error, run_dir))
