"""A grid sweeper that skips impossible cells and records every cell's outcome (hydra/sweeper=sim_grid).

Hydra's basic sweeper launches every cell of the grid and stops the multirun at the first batch with
a failed job. An ablation grid over model.F x model.K holds cells that cannot work by construction
(K > F), and one failed run should not hide the others. This sweeper:

- composes each cell's config and skips a cell where a `skip_if_greater` pair holds (`model.K >
  model.F`), so no launcher (a Slurm array included) spends a job on it;
- launches the rest in batches of `max_batch_size` through the configured launcher (Hydra's basic
  sweeper's grid and batching, without its stop at the first failed batch);
- appends one line per cell to `<sweep dir>/jobs.jsonl`: state (COMPLETE, FAIL, SKIPPED), the swept
  values as composed, the overrides, the run directory, the error or the reason for skipping;
- raises `SweepFailed` at the end if a job failed (exit status 1), after every cell has run.

This module is imported by Hydra's plugin scan on every start: it imports nothing heavy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RECORD = "jobs.jsonl"


class SweepFailed(CompactHydraException):
    """Some jobs of the grid failed (each is in jobs.jsonl with its error). Hydra prints the message
    alone: the jobs' own logs hold the tracebacks."""


class GridSweeper(Sweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        skip_if_greater: dict[str, str] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.skip_if_greater = dict(skip_if_greater or {})
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _skip_reason(self, cfg: DictConfig) -> str | None:
        for big, small in self.skip_if_greater.items():
            a, b = OmegaConf.select(cfg, big), OmegaConf.select(cfg, small)
            if a is not None and b is not None and a > b:
                return f"{big}={a} > {small}={b}"
        return None

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        # Imported here, not subclassed: Hydra's plugin scan executes its core plugins' modules again,
        # so a BasicSweeper subclass defined before the scan would no longer be one after it.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
        swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
        # The grid as the basic sweeper builds it: the product of the sweeps, in command-line order.
        cells = BasicSweeper.split_arguments(parsed, None)[0]

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # One record per launch of the grid: a re-run (which resumes unfinished cells) reports afresh.
        record = sweep_dir / RECORD
        record.write_text("", encoding="utf-8")

        todo: list[tuple[list[str], dict[str, Any]]] = []
        for cell in cells:
            # Composing also checks every override before anything runs, as the basic sweeper does.
            cfg = loader.load_sweep_config(self.config, list(cell))
            values = {key: OmegaConf.select(cfg, key) for key in swept}
            why = self._skip_reason(cfg)
            if why is None:
                todo.append((cell, values))
            else:
                log.warning("skipped %s: %s", " ".join(cell), why)
                _append(
                    record,
                    {
                        "job": None,
                        "state": "SKIPPED",
                        "params": values,
                        "overrides": cell,
                        "run_dir": None,
                        "reason": why,
                    },
                )
        log.info(
            "grid of %d cells: %d to run, %d skipped; record in %s",
            len(cells),
            len(todo),
            len(cells) - len(todo),
            record,
        )

        size = self.max_batch_size or len(todo) or 1
        returns: list[list[JobReturn]] = []
        failed = 0
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            results = list(self.launcher.launch([cell for cell, _ in batch], initial_job_idx=start))
            for n, ((cell, values), ret) in enumerate(zip(batch, results, strict=True), start):
                entry = {
                    "job": n,
                    "state": "COMPLETE",
                    "params": values,
                    "overrides": cell,
                    "run_dir": str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None,
                }
                try:
                    _ = ret.return_value  # re-raises the job's exception
                except Exception as exc:  # one failed cell is recorded; the grid goes on
                    failed += 1
                    entry.update(state="FAIL", error=f"{type(exc).__name__}: {exc}")
                    log.error("job %d (%s) failed: %s", n, " ".join(cell), entry["error"])
                _append(record, entry)
            returns.append(results)
        if failed:
            raise SweepFailed(
                f"{failed} of {len(todo)} jobs failed; each is in {record} with its error, and its "
                "logs/stdout.log says more"
            )
        return returns


def _append(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


def read_record(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The cells of a sim_grid sweep (jobs.jsonl), or [] for a directory that is not one."""
    path = Path(sweep_dir) / RECORD
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
