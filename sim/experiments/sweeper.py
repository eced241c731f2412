"""A resumable optuna sweeper: the study in SQLite is the sweep's memory, the requested total is a total.

hydra-optuna-sweeper 1.2/1.3 asks for `n_trials` *new* trials on every launch and numbers Hydra jobs
from 0, so re-running an interrupted sweep overshoots the total and writes its first trials into the
directories of the earlier ones. `ResumableOptunaSweeperImpl` keeps the plugin's search-space handling
and changes the loop:

- it counts the study's finished trials (COMPLETE, FAIL, PRUNED) and runs only what is left of
  `n_trials`; trials another live process is running count too, so two processes share one total;
- each job's `hydra.job.num` is its optuna trial number, so `hydra.sweep.subdir: ${hydra.job.num}`
  names a directory no resume or second process reuses;
- a failed job (any exception) or an undefined objective (NaN) is recorded as FAIL with its error,
  logged, and the sweep goes on (`max_failure_rate`, per batch as in the plugin, can stop it);
- every finished trial is appended to `<sweep_dir>/trials.jsonl` (number, state, values, params,
  run directory, error), and `optimization_results.yaml` is written at the end as the plugin does.

Hydra only instantiates sweepers from the `hydra_plugins` namespace: the class it sees is
`hydra_plugins.sim_optuna_sweeper.SimOptunaSweeper` (config `hydra/sweeper=sim_optuna`), which
delegates here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import Trial, TrialState

from sim.core.cli import describe_error, failed_trials_message
from sim.core.errors import ConfigError, SweepFailed

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def _objective_values(raw: Any, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """The job's return value as optuna values, or (None, why it cannot be one)."""
    items = list(raw) if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]
    if len(items) != n_objectives:
        return None, f"the job returned {len(items)} value(s) for {n_objectives} objective(s): {raw!r}"
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        return None, f"the job returned {raw!r}, not numbers"
    if any(not math.isfinite(v) for v in values):
        return None, (f"the objective is undefined ({values}): a metric had no value on the val split "
                      "at the best epoch (e.g. risk_high_recall with no 'high' samples)")
    return values, None


def _trial_name(record: dict[str, Any]) -> str:
    params = " ".join(f"{k}={v}" for k, v in record["params"].items())
    return f"trial {record['trial']}" + (f" ({params})" if params else "")


def _n_counted(study: optuna.Study, stale: set[int]) -> int:
    """Trials that count toward the total: finished ones, and running ones of a live process."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in FINISHED or (t.state == TrialState.RUNNING and t.number not in stale))


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's OptunaSweeperImpl with a resumable, failure-tolerant trial loop (see module doc)."""

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid = isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler
        override_dists, fixed_params = create_params_from_overrides(params_conf)
        dists: dict[str, BaseDistribution] = dict(self.search_space_distributions or {})
        dists.update(override_dists)
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in dists.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info("GridSampler: n_trials is at most the grid size, %d", self.n_trials)
        for name in fixed_params:
            dists.pop(name, None)
        directions = self._get_directions()

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        # SQLite cannot create the directory of its database file.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        self._check_study(study, directions, sweep_dir, dists, fixed_params)

        trials = study.get_trials(deepcopy=False)
        # RUNNING trials found at start belong to an interrupted sweep or to a live second process;
        # they cannot be told apart, so they do not count (their directories are left as they are).
        stale = {t.number for t in trials if t.state == TrialState.RUNNING}
        if stale:
            log.warning("trials %s of study %r are RUNNING: left by an interrupted sweep (or running in another "
                        "process); they do not count toward n_trials", sorted(stale), study.study_name)
        n_done = sum(t.state in FINISHED for t in trials)
        log.info("study %r in %s: %d of n_trials=%d finished, %d to run; sweep dir %s",
                 study.study_name, self.storage or "memory", n_done, self.n_trials,
                 max(0, self.n_trials - n_done), sweep_dir)

        while (to_go := self.n_trials - _n_counted(study, stale)) > 0:
            batch = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = self._configure_trials(batch, dists, fixed_params)
            returns = self._launch(batch, overrides)
            failures = []
            for trial, ovr, ret in zip(batch, overrides, returns):
                record = self._finish(study, trial, ovr, ret, directions, is_grid, sweep_dir)
                if record["error"] is not None:
                    failures.append(record)
            if len(failures) / len(returns) > self.max_failure_rate:
                first = failures[0]
                why = failed_trials_message(len(failures), len(returns), _trial_name(first), first["error"],
                                            first["run_dir"])
                raise SweepFailed(f"the sweep stopped above hydra.sweeper.max_failure_rate={self.max_failure_rate}: "
                                  f"in its last batch, {why}; every trial: {sweep_dir / 'trials.jsonl'}")

        self._write_results(study, directions, sweep_dir)

    # ---- pieces of the loop ---------------------------------------------------------------------
    def _check_study(self, study: optuna.Study, directions: list[str], sweep_dir: Path,
                     dists: dict[str, BaseDistribution], fixed_params: dict[str, Any]) -> None:
        """Refuse a stored study that cannot be continued; warn where a resume changed the sweep."""
        stored = [d.name.lower() for d in study.directions]
        if stored != [d.lower() for d in directions]:
            raise ConfigError(f"study {study.study_name!r} in {self.storage} optimizes {stored}, this sweep asks "
                              f"{directions} (hydra.sweeper.direction): use another hydra.sweeper.study_name "
                              "or hydra.sweep.dir")
        n_trials = len(study.get_trials(deepcopy=False))
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        if subdir == "${hydra.job.num}" and (sweep_dir / str(n_trials)).exists():
            raise ConfigError(f"{sweep_dir / str(n_trials)} exists but study {study.study_name!r} in "
                              f"{self.storage or 'memory'} has only {n_trials} trials, so the next trial would "
                              "write into it: keep the study with its sweep directory (hydra.sweeper.storage), "
                              "or choose a new hydra.sweep.dir")
        setup = {"search_space": {k: repr(v) for k, v in sorted(dists.items())},
                 "fixed": {k: str(v) for k, v in sorted(fixed_params.items())}}
        before = study.user_attrs.get("sim_sweep")
        if before is None:
            study.set_user_attr("sim_sweep", setup)
        elif before != setup:
            changed = sorted(k for part in ("search_space", "fixed")
                             for k in set(before.get(part, {})) | set(setup[part])
                             if before.get(part, {}).get(k) != setup[part].get(k))
            log.warning("resuming study %r with a different sweep: %s changed since it started; earlier "
                        "trials keep their settings", study.study_name, ", ".join(changed))

    def _launch(self, trials: list[Trial], overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
        """Launch with hydra.job.num = trial number (one launch per trial if the numbers are not a run)."""
        numbers = [t.number for t in trials]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return list(self.launcher.launch(overrides, initial_job_idx=numbers[0]))
        return [r for t, o in zip(trials, overrides) for r in self.launcher.launch([o], initial_job_idx=t.number)]

    def _finish(self, study: optuna.Study, trial: Trial, overrides: Sequence[str], ret: JobReturn,
                directions: list[str], is_grid: bool, sweep_dir: Path) -> dict[str, Any]:
        """Tell the study how the trial ended and record it. Returns the record (its "error" is None
        unless the trial failed)."""
        values: list[float] | None = None
        error: str | None = None
        if ret.status == JobStatus.FAILED:
            # Any job failure is one failed trial, not the end of the sweep. Read directly: `return_value`
            # re-raises it after writing Hydra's own line to stderr, which the warning below makes redundant.
            error = describe_error(ret._return_value)
        else:
            values, why = _objective_values(ret.return_value, len(directions))
            if why is not None:
                error = describe_error(ValueError(why))
        run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None
        trial.set_user_attr("run_dir", run_dir)
        if error is not None:
            trial.set_user_attr("error", error)
        try:
            study.tell(trial, values=values if error is None else None,
                       state=TrialState.COMPLETE if error is None else TrialState.FAIL)
        except RuntimeError as exc:
            # GridSampler stops the study once the grid is done; outside optimize() that is reported this way.
            if not (is_grid and "Study.stop" in str(exc)):
                raise
        objective = ret.cfg.get("objective") if ret.cfg is not None else None
        objective = OmegaConf.to_container(objective) if OmegaConf.is_config(objective) else objective
        record = {"trial": trial.number, "state": "COMPLETE" if error is None else "FAIL",
                  "objective": objective, "values": values, "params": trial.params, "overrides": list(overrides),
                  "run_dir": run_dir, "error": error}
        with open(sweep_dir / "trials.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if error is None:
            log.info("trial %d: %s = %s  (%s)", trial.number, objective, values, run_dir)
        else:
            log.warning("trial %d failed and is recorded as FAIL; the sweep goes on. %s  (overrides: %s)",
                        trial.number, error, " ".join(overrides))
        return record

    def _write_results(self, study: optuna.Study, directions: list[str], sweep_dir: Path) -> None:
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        n_failed = sum(t.state == TrialState.FAIL for t in trials)
        if not complete:
            every = f"every trial: {sweep_dir / 'trials.jsonl'}"
            failed = [t for t in trials if t.state == TrialState.FAIL]
            if not failed:
                raise SweepFailed(f"no trial of study {study.study_name!r} completed (none failed either); {every}")
            first = failed[0]
            # A study begun by another sweeper has no recorded error or run directory.
            why = failed_trials_message(n_failed, len(trials), _trial_name({"trial": first.number, "params": first.params}),
                                        first.user_attrs.get("error", "an unrecorded error"), first.user_attrs.get("run_dir"))
            raise SweepFailed(f"no trial of study {study.study_name!r} completed: {why}; {every}")
        summary: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "directions": directions,
                                   "n_complete": len(complete), "n_failed": n_failed}
        if len(directions) < 2:
            best = study.best_trial
            summary.update(best_trial=best.number, best_params=best.params, best_value=best.value,
                           best_run_dir=best.user_attrs.get("run_dir"))
            log.info("best trial %d: value %s, params %s", best.number, best.value, best.params)
        else:
            summary["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values,
                                     "run_dir": t.user_attrs.get("run_dir")} for t in study.best_trials]
            log.info("Pareto front: %d trials", len(summary["solutions"]))
            for t in study.best_trials:
                log.info("    trial %d: values %s, params %s", t.number, t.values, t.params)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
