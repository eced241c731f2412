"""SIM's optuna sweeper: the study is the sweep's memory, the requested total is a total, bad trials are pruned.

Hydra sees it as `hydra/sweeper=optuna` or `hydra/sweeper=sim_optuna` (hydra_plugins/sim_optuna_sweeper.py
holds the config and the class Hydra instantiates). It takes hydra-optuna-sweeper's keys and search
space syntax (sim/experiments/search_space.py) and runs this loop on optuna >= 4:

- it counts the study's finished trials (COMPLETE, FAIL, PRUNED) and runs only what is left of
  `n_trials`; trials another live process is running count too, so two processes share one total;
- each job's `hydra.job.num` is its optuna trial number, so `hydra.sweep.subdir: ${hydra.job.num}`
  names a directory no resume or second process reuses (and a job finds its trial by it);
- with a pruner (`hydra.sweeper.pruner`), each job reports its val metric per epoch and stops when
  the pruner says so (sim/training/pruning.py); the trial is recorded as PRUNED with its run tree as it was;
- a failed job (any exception) or an undefined objective (NaN) is recorded as FAIL with its error,
  logged, and the sweep goes on (`max_failure_rate`, per batch as in the plugin, can stop it);
- every finished trial is appended to `<sweep_dir>/trials.jsonl` (number, state, values, params,
  run directory, error), and `optimization_results.yaml` is written at the end as the plugin does.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, cast

import optuna
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import Trial, TrialState

from sim.core.cli import failed_trials_message, sim_error_in
from sim.core.errors import ConfigError, SweepFailed
from sim.experiments.launching import LaunchingSweeper, append_record, job_result, run_dir_of
from sim.experiments.search_space import (
    distribution_from_config,
    grid_choices,
    params_from_overrides,
)
from sim.training import pruning
from sim.training.pruners import make_pruner, prunes

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
        return None, (
            f"the objective is undefined ({values}): a metric had no value on the val split "
            "at the best epoch (e.g. risk_high_recall with no 'high' samples)"
        )
    return values, None


def _trial_name(record: dict[str, Any]) -> str:
    params = " ".join(f"{k}={v}" for k, v in record["params"].items())
    return f"trial {record['trial']}" + (f" ({params})" if params else "")


def _n_counted(study: optuna.Study, stale: set[int]) -> int:
    """Trials that count toward the total: finished ones, and running ones of a live process."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in FINISHED or (t.state == TrialState.RUNNING and t.number not in stale)
    )


class OptunaSweeperImpl(LaunchingSweeper):
    """A resumable, failure-tolerant, pruning optuna loop (see the module doc)."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None,
        custom_search_space: str | None,
        params: DictConfig | None,
        pruner: Any = None,
    ) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: expected a fraction in [0, 1]")
        if n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_jobs={n_jobs}: expected at least 1 trial per batch")
        self.sampler = sampler
        self.direction = direction
        self.storage = None if storage is None else str(storage)
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.search_space = search_space
        self.params = params
        self.pruner = make_pruner(pruner)
        self.extend_search_space: Callable[[DictConfig, Trial], None] | None = (
            instantiate({"_target_": custom_search_space, "_partial_": True}) if custom_search_space else None
        )

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
        """(distributions, fixed values) from `params`, the deprecated `search_space` and the command line."""
        dists: dict[str, BaseDistribution] = {}
        if self.search_space is not None and self.params is None:
            warnings.warn(
                "hydra.sweeper.search_space is deprecated (since Hydra 1.2): write the search space in "
                "hydra.sweeper.params, e.g. `optim.lr: tag(log, interval(1e-4, 1e-2))`",
                DeprecationWarning,
                stacklevel=2,
            )
            dists = {str(k): distribution_from_config(v) for k, v in self.search_space.items()}
        elif self.search_space is not None:
            log.warning("both hydra.sweeper.params and hydra.sweeper.search_space are set: the search space is params")
        args = [f"{k!s}={v}" for k, v in (self.params or {}).items()] + list(arguments)
        from_overrides, fixed = params_from_overrides(args)
        dists.update(from_overrides)
        for name in fixed:
            dists.pop(name, None)
        return dists, fixed

    def _directions(self) -> list[str]:
        many = isinstance(self.direction, Sequence) and not isinstance(self.direction, str)
        items = self.direction if many else [self.direction]
        return [d.name if isinstance(d, Enum) else str(d) for d in items]

    def sweep(self, arguments: list[str]) -> None:
        dists, fixed_params = self._search_space(arguments)
        is_grid = isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler
        if is_grid:
            grid = {name: grid_choices(name, d) for name, d in dists.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info("GridSampler: n_trials is at most the grid size, %d", self.n_trials)
        directions = self._directions()
        if len(directions) > 1 and prunes(self.pruner):
            raise ConfigError(
                f"hydra.sweeper.pruner={type(self.pruner).__name__} with {len(directions)} objectives: "
                "optuna prunes single-objective studies only; use hydra.sweeper.pruner=none"
            )
        sweep_dir = self.sweep_dir()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            pruner=self.pruner,
            directions=cast(Any, directions),  # validated names: minimize | maximize
            load_if_exists=True,
        )
        self._check_study(study, directions, sweep_dir, dists, fixed_params)
        stale = self._stale_trials(study, sweep_dir)
        while (to_go := self.n_trials - _n_counted(study, stale)) > 0:
            batch = [study.ask(dists) for _ in range(min(to_go, self.n_jobs))]
            self._run_batch(study, batch, fixed_params, directions, is_grid, sweep_dir)
        write_results(study, directions, sweep_dir)

    # ---- pieces of the loop ---------------------------------------------------------------------
    def _stale_trials(self, study: optuna.Study, sweep_dir: Path) -> set[int]:
        """Log where the study stands; the trials found RUNNING, which do not count toward n_trials."""
        trials = study.get_trials(deepcopy=False)
        # RUNNING trials found at start belong to an interrupted sweep or to a live second process;
        # they cannot be told apart, so they do not count (their directories are left as they are).
        stale = {t.number for t in trials if t.state == TrialState.RUNNING}
        if stale:
            log.warning(
                "trials %s of study %r are RUNNING: left by an interrupted sweep (or running in another "
                "process); they do not count toward n_trials",
                sorted(stale),
                study.study_name,
            )
        n_done = sum(t.state in FINISHED for t in trials)
        log.info(
            "study %r in %s: %d of n_trials=%d finished, %d to run; sampler %s, pruner %s; sweep dir %s",
            study.study_name,
            self.storage or "memory",
            n_done,
            self.n_trials,
            max(0, self.n_trials - n_done),
            type(study.sampler).__name__,
            type(self.pruner).__name__,
            sweep_dir,
        )
        return stale

    def _run_batch(
        self,
        study: optuna.Study,
        batch: list[Trial],
        fixed_params: dict[str, str],
        directions: list[str],
        is_grid: bool,
        sweep_dir: Path,
    ) -> None:
        """Launch one batch of asked trials, tell the study how each ended, and stop the sweep above
        max_failure_rate."""
        overrides = self._configure_trials(batch, fixed_params)
        pruning.LIVE_TRIALS.update({t.number: t for t in batch})
        try:
            returns = self.launch_numbered(overrides, [t.number for t in batch])
        finally:
            for t in batch:
                pruning.LIVE_TRIALS.pop(t.number, None)
        failures = []
        for trial, ovr, ret in zip(batch, overrides, returns, strict=True):
            record = self._finish(study, trial, ovr, ret, directions, is_grid, sweep_dir)
            if record["error"] is not None:
                failures.append(record)
        if failures and len(failures) / len(returns) > self.max_failure_rate:
            first = failures[0]
            why = failed_trials_message(
                len(failures), len(returns), _trial_name(first), first["error"], first["run_dir"]
            )
            raise SweepFailed(
                f"the sweep stopped above hydra.sweeper.max_failure_rate={self.max_failure_rate}: "
                f"in its last batch, {why}; every trial: {sweep_dir / 'trials.jsonl'}"
            )

    def _configure_trials(self, trials: list[Trial], fixed_params: dict[str, str]) -> list[tuple[str, ...]]:
        """Each trial's overrides: its sampled values (`study.ask(dists)`) and the fixed ones (the plugin's rules)."""
        overrides = []
        for trial in trials:
            for name, value in fixed_params.items():
                trial.set_user_attr(name, value)
            if self.extend_search_space is not None:
                self.extend_search_space(cast(DictConfig, self.config), trial)
            overlap = trial.params.keys() & trial.user_attrs.keys()
            if overlap:
                raise ConfigError(
                    f"{sorted(overlap)} are both fixed and searched: give each key one value or one sweep"
                )
            overrides.append(tuple(f"{name}={value}" for name, value in {**trial.params, **fixed_params}.items()))
        return overrides

    def _check_study(
        self,
        study: optuna.Study,
        directions: list[str],
        sweep_dir: Path,
        dists: dict[str, BaseDistribution],
        fixed_params: dict[str, Any],
    ) -> None:
        """Refuse a stored study that cannot be continued; warn where a resume changed the sweep."""
        stored = [d.name.lower() for d in study.directions]
        if stored != [d.lower() for d in directions]:
            raise ConfigError(
                f"study {study.study_name!r} in {self.storage} optimizes {stored}, this sweep asks "
                f"{directions} (hydra.sweeper.direction): use another hydra.sweeper.study_name "
                "or hydra.sweep.dir"
            )
        n_trials = len(study.get_trials(deepcopy=False))
        sweep_node = OmegaConf.to_container(cast(DictConfig, self.config).hydra.sweep, resolve=False)
        subdir = sweep_node.get("subdir") if isinstance(sweep_node, dict) else None
        if subdir == "${hydra.job.num}" and (sweep_dir / str(n_trials)).exists():
            raise ConfigError(
                f"{sweep_dir / str(n_trials)} exists but study {study.study_name!r} in "
                f"{self.storage or 'memory'} has only {n_trials} trials, so the next trial would "
                "write into it: keep the study with its sweep directory (hydra.sweeper.storage), "
                "or choose a new hydra.sweep.dir"
            )
        _remember_sweep(study, dists, fixed_params)

    def _finish(
        self,
        study: optuna.Study,
        trial: Trial,
        overrides: Sequence[str],
        ret: JobReturn,
        directions: list[str],
        is_grid: bool,
        sweep_dir: Path,
    ) -> dict[str, Any]:
        """Tell the study how the trial ended and record it (the record is returned, its `error` set
        for a failed trial)."""
        state, values, error = _trial_outcome(ret, len(directions))
        run_dir = run_dir_of(ret)
        trial.set_user_attr("run_dir", run_dir)
        if error is not None:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        try:
            study.tell(trial, values=values, state=state)
        except RuntimeError as exc:
            # GridSampler stops the study once the grid is done; outside optimize() that is reported this way.
            if not (is_grid and "Study.stop" in str(exc)):
                raise
        objective = ret.cfg.get("objective") if ret.cfg is not None else None
        record = {
            "trial": trial.number,
            "state": state.name,
            "objective": OmegaConf.to_container(objective) if OmegaConf.is_config(objective) else objective,
            "values": values,
            "params": trial.params,
            "overrides": list(overrides),
            "run_dir": run_dir,
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
        if state == TrialState.PRUNED:
            frozen = next(
                t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.number == trial.number
            )
            record["pruned_at_epoch"] = frozen.last_step
            record["last_value"] = frozen.value
        append_record(sweep_dir / "trials.jsonl", record)
        _log_trial(record)
        return record


def _remember_sweep(study: optuna.Study, dists: dict[str, BaseDistribution], fixed_params: dict[str, Any]) -> None:
    """Store the sweep's search space in the study; warn when a resume changed it."""
    setup = {
        "search_space": {k: repr(v) for k, v in sorted(dists.items())},
        "fixed": {k: str(v) for k, v in sorted(fixed_params.items())},
    }
    before = study.user_attrs.get("sim_sweep")
    if before is None:
        study.set_user_attr("sim_sweep", setup)
    elif before != setup:
        changed = sorted(
            k
            for part in ("search_space", "fixed")
            for k in set(before.get(part, {})) | set(setup[part])
            if before.get(part, {}).get(k) != setup[part].get(k)
        )
        log.warning(
            "resuming study %r with a different sweep: %s changed since it started; earlier trials keep their settings",
            study.study_name,
            ", ".join(changed),
        )


def _trial_outcome(ret: JobReturn, n_objectives: int) -> tuple[TrialState, list[float] | None, Exception | None]:
    """(state, values, error) of a finished job: pruned, failed (with its error) or complete."""
    raw, exc = job_result(ret)
    if isinstance(exc, optuna.TrialPruned):
        return TrialState.PRUNED, None, None
    if exc is not None:  # any job failure is one failed trial, not the end of the sweep
        return TrialState.FAIL, None, sim_error_in(exc) or exc
    values, why = _objective_values(raw, n_objectives)
    if why is not None:
        return TrialState.FAIL, None, ValueError(why)
    return TrialState.COMPLETE, values, None


def _log_trial(record: dict[str, Any]) -> None:
    n, objective, run_dir = record["trial"], record["objective"], record["run_dir"]
    if record["state"] == TrialState.COMPLETE.name:
        log.info("trial %d: %s = %s  (%s)", n, objective, record["values"], run_dir)
    elif record["state"] == TrialState.PRUNED.name:
        epoch, value = record["pruned_at_epoch"], record["last_value"]
        log.info("trial %d pruned after epoch %s (%s = %s)  (%s)", n, epoch, objective, value, run_dir)
    else:
        log.warning(
            "trial %d failed and is recorded as FAIL; the sweep goes on. %s  (overrides: %s)",
            n,
            record["error"],
            " ".join(record["overrides"]),
        )


def write_results(study: optuna.Study, directions: list[str], sweep_dir: Path) -> None:
    """optimization_results.yaml as hydra-optuna-sweeper writes it (the Pareto front for several
    objectives); a study where no trial completed raises SweepFailed naming the first failure."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    n_failed = sum(t.state == TrialState.FAIL for t in trials)
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    if not complete:
        every = f"every trial: {sweep_dir / 'trials.jsonl'}"
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if not failed:
            raise SweepFailed(f"no trial of study {study.study_name!r} completed ({n_pruned} pruned); {every}")
        first = failed[0]
        # A study begun by another sweeper has no recorded error or run directory.
        why = failed_trials_message(
            n_failed,
            len(trials),
            _trial_name({"trial": first.number, "params": first.params}),
            first.user_attrs.get("error", "an unrecorded error"),
            first.user_attrs.get("run_dir"),
        )
        raise SweepFailed(f"no trial of study {study.study_name!r} completed: {why}; {every}")
    summary: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "directions": directions,
        "n_complete": len(complete),
        "n_pruned": n_pruned,
        "n_failed": n_failed,
    }
    if len(directions) < 2:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_params=best.params,
            best_value=best.value,
            best_run_dir=best.user_attrs.get("run_dir"),
        )
        log.info("best trial %d: value %s, params %s", best.number, best.value, best.params)
    else:
        summary["solutions"] = [
            {"trial": t.number, "params": t.params, "values": t.values, "run_dir": t.user_attrs.get("run_dir")}
            for t in study.best_trials
        ]
        log.info("Pareto front: %d trials", len(summary["solutions"]))
        for t in study.best_trials:
            log.info("    trial %d: values %s, params %s", t.number, t.values, t.params)
    OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
