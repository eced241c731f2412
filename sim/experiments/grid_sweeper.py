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
- ends with one `error:` line and exit status 1 if a job failed, after every cell has run.

This module is imported by Hydra's plugin scan on every start: it imports nothing heavy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from sim.core.cli import failed_trials_message
from sim.core.errors import SweepFailed
from sim.experiments.launching import LaunchingSweeper, append_record, job_result, read_records, run_dir_of

log = logging.getLogger(__name__)

RECORD = "jobs.jsonl"


class GridSweeper(LaunchingSweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        skip_if_greater: dict[str, str] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.skip_if_greater = dict(skip_if_greater or {})

    def _skip_reason(self, cfg: DictConfig) -> str | None:
        for big, small in self.skip_if_greater.items():
            a, b = OmegaConf.select(cfg, big), OmegaConf.select(cfg, small)
            if a is not None and b is not None and a > b:
                return f"{big}={a} > {small}={b}"
        return None

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        assert self.config is not None
        sweep_dir = self.sweep_dir()
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # One record per launch of the grid: a re-run (which resumes unfinished cells) reports afresh.
        record = sweep_dir / RECORD
        record.write_text("", encoding="utf-8")
        todo = self._plan(arguments, record)
        size = self.max_batch_size or len(todo) or 1
        returns: list[list[JobReturn]] = []
        failed: list[dict[str, Any]] = []
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            results = self.launch_numbered([cell for cell, _ in batch], range(start, start + len(batch)))
            for n, ((cell, values), ret) in enumerate(zip(batch, results, strict=True), start):
                entry = self._record_job(record, n, cell, values, ret)
                if entry["state"] == "FAIL":
                    failed.append(entry)
            returns.append(results)
        if failed:
            first = failed[0]
            name = f"job {first['job']} ({' '.join(first['overrides'])})"
            why = failed_trials_message(len(failed), len(todo), name, first["error"], first["run_dir"], noun="job")
            raise SweepFailed(f"{why}; every job: {record}")
        return returns

    def _plan(self, arguments: list[str], record: Path) -> list[tuple[list[str], dict[str, Any]]]:
        """The cells to launch, each with its swept values as composed; the skipped ones are recorded."""
        assert self.config is not None and self.hydra_context is not None
        # Imported here, not subclassed: Hydra's plugin scan executes its core plugins' modules again,
        # so a BasicSweeper subclass defined before the scan would no longer be one after it.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        loader = self.hydra_context.config_loader
        args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        # The grid as the basic sweeper builds it: the product of the sweeps, in command-line order.
        cells = BasicSweeper.split_arguments(parsed, None)[0]
        todo: list[tuple[list[str], dict[str, Any]]] = []
        for cell in cells:
            # Composing also checks every override before anything runs, as the basic sweeper does.
            cfg = loader.load_sweep_config(self.config, list(cell))
            values = {key: swept_value(cfg, key) for key in swept}
            why = self._skip_reason(cfg)
            if why is None:
                todo.append((cell, values))
                continue
            log.warning("skipped %s: %s", " ".join(cell), why)
            entry = {"job": None, "state": "SKIPPED", "params": values, "overrides": cell, "run_dir": None}
            append_record(record, {**entry, "reason": why})
        log.info(
            "grid of %d cells: %d to run, %d skipped; record in %s",
            len(cells),
            len(todo),
            len(cells) - len(todo),
            record,
        )
        return todo

    @staticmethod
    def _record_job(record: Path, n: int, cell: list[str], values: dict[str, Any], ret: JobReturn) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "job": n,
            "state": "COMPLETE",
            "params": values,
            "overrides": cell,
            "run_dir": run_dir_of(ret),
        }
        _, exc = job_result(ret)
        if exc is not None:  # one failed cell is recorded; the grid goes on
            entry.update(state="FAIL", error=f"{type(exc).__name__}: {exc}")
            log.error("job %d (%s) failed: %s", n, " ".join(cell), entry["error"])
        append_record(record, entry)
        return entry


def swept_value(cfg: DictConfig, key: str) -> Any:
    """A swept key's value in a cell's composed config; for a config group (`+variant=a,b`), its option."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    return choices[key] if key in choices else OmegaConf.select(cfg, key)


def read_record(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The cells of a sim_grid sweep (jobs.jsonl), or [] for a directory that is not one."""
    return read_records(Path(sweep_dir) / RECORD)
