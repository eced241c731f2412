"""What SIM's sweepers share: the launcher Hydra configured, numbered launches, and one JSON line per job.

The optuna sweeper (sweeper.py) and the grid sweeper (grid_sweeper.py) differ in how they choose the
next jobs; launching them, reading how each ended and recording it is the same code. Hydra's plugin
scan imports the grid sweeper on every start, so this module imports nothing heavy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class LaunchingSweeper(Sweeper):
    """A sweeper that runs its jobs through the launcher of the composed config (`hydra/launcher`)."""

    config: DictConfig | None = None
    launcher: Launcher | None = None
    hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep_dir(self) -> Path:
        """`hydra.sweep.dir`, created (an SQLite study cannot create the directory of its file)."""
        assert self.config is not None, "setup() sets the config"
        path = Path(str(self.config.hydra.sweep.dir))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def launch_numbered(self, overrides: Sequence[Sequence[str]], numbers: Sequence[int]) -> list[JobReturn]:
        """Launch jobs whose `hydra.job.num` are `numbers`: one launch for a run of consecutive
        numbers (a Slurm array), one launch per job otherwise."""
        assert self.launcher is not None, "setup() sets the launcher"
        if list(numbers) == list(range(numbers[0], numbers[0] + len(numbers))):
            return list(self.launcher.launch(overrides, initial_job_idx=numbers[0]))
        return [
            r for n, o in zip(numbers, overrides, strict=True) for r in self.launcher.launch([o], initial_job_idx=n)
        ]


def job_result(ret: JobReturn) -> tuple[Any, Exception | None]:
    """(the job's return value, None), or (None, the exception the job raised)."""
    try:
        return ret.return_value, None  # re-raises the job's exception
    except Exception as exc:  # a failed job is reported to the sweeper, which goes on
        return None, exc


def run_dir_of(ret: JobReturn) -> str | None:
    """The job's run directory (None if it failed before Hydra set one up)."""
    return str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None


def append_record(path: Path, entry: dict[str, Any]) -> None:
    """One finished (or skipped) job as a line of the sweep's JSONL record."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """A sweep's JSONL record, or [] where there is none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
