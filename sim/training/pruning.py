"""Pruning a sweep trial from inside its training run.

Under `hydra/sweeper=optuna` or `sim_optuna` with a pruner (`hydra.sweeper.pruner=median`), each
job is one optuna trial: its `hydra.job.num` is the trial number. `sweep_callbacks(cfg)` finds that
trial and returns a `PruningCallback`, which reports the objective metric of every epoch's val split
(`objective`, which is `checkpoint.monitor` unless a sweep names another) to the trial and asks the
pruner whether to go on. A pruned run stops after that epoch like any run a callback stops: its
checkpoints and metric lines are written. The Hydra main then raises `optuna.TrialPruned`, and the
sweeper records the trial as PRUNED.

The trial is found in this process when the launcher runs jobs in the sweeper's process (Hydra's
basic launcher); jobs in other processes (joblib, Slurm) load it from `hydra.sweeper.storage`, so
pruning there needs a database every job can reach (SQLite on a shared file system, or a server).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from sim.training.callbacks import Callback
from sim.training.distributed import broadcast_object
from sim.training.pruners import make_pruner, prunes

if TYPE_CHECKING:
    import optuna

    from sim.training.trainer import Trainer

log = logging.getLogger(__name__)

SWEEPER_TARGET = "hydra_plugins.sim_optuna_sweeper.SimOptunaSweeper"

# Trials of the batch the sweeper is running, by number: the jobs of Hydra's basic launcher run in the
# sweeper's process and report to these (an in-memory study can be reached no other way).
LIVE_TRIALS: dict[int, optuna.trial.Trial] = {}


class PruningCallback(Callback):
    """Reports val[metric] to the trial each epoch and stops training when the pruner says so."""

    def __init__(self, trial: optuna.trial.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, train: dict[str, Any], val: dict[str, Any], is_best: bool
    ) -> None:
        prune = False
        if trainer.dist.is_main:
            value = val.get(self.metric)
            if value is None or not math.isfinite(float(value)):
                # optuna would store NaN and the pruner compare against it; an undefined epoch says nothing.
                log.warning(
                    "trial %d, epoch %d: val %s is undefined; not reported to the pruner",
                    self.trial.number,
                    epoch,
                    self.metric,
                )
            else:
                self.trial.report(float(value), step=epoch)
                prune = self.trial.should_prune()
        # Every rank must stop at the same epoch.
        if broadcast_object(prune):
            self.pruned_at = epoch
            trainer.should_stop = True
            log.info(
                "trial %d pruned after epoch %d (val %s = %s): its run ends here, checkpoints and metrics kept",
                self.trial.number,
                epoch,
                self.metric,
                val.get(self.metric),
            )

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if self.pruned_at is not None:
            result["pruned_at_epoch"] = self.pruned_at


def _trial_from_storage(
    sweeper: DictConfig, number: int, pruner: optuna.pruners.BasePruner
) -> optuna.trial.Trial | None:
    import optuna

    storage_url, study_name = sweeper.get("storage"), sweeper.get("study_name")
    if not storage_url or not study_name:
        log.warning(
            "pruning is off for this job: it runs outside the sweeper's process, and only a study in "
            "hydra.sweeper.storage with a hydra.sweeper.study_name can be reached from here"
        )
        return None
    storage = optuna.storages.get_storage(str(storage_url))
    study = optuna.load_study(study_name=str(study_name), storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(str(study_name)), number)
    return optuna.trial.Trial(study, trial_id)


def sweep_callbacks(cfg: DictConfig) -> list[Callback]:
    """[PruningCallback] for a job of SIM's optuna sweeper with a pruner; [] for any other run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return []
    sweeper = hydra_cfg.sweeper
    if hydra_cfg.mode != RunMode.MULTIRUN or sweeper.get("_target_") != SWEEPER_TARGET:
        return []
    pruner = make_pruner(sweeper.get("pruner"))
    metric = cfg.get("objective")
    if not prunes(pruner) or not isinstance(metric, str):
        return []  # a study of several objectives cannot prune; the sweeper refuses that pairing
    number = int(hydra_cfg.job.num)
    trial = LIVE_TRIALS.get(number) or _trial_from_storage(sweeper, number, pruner)
    if trial is None:
        return []
    log.info("optuna trial %d: val %s is reported each epoch to %s", number, metric, type(pruner).__name__)
    return [PruningCallback(trial, metric)]


def raise_if_pruned(result: dict[str, Any]) -> None:
    """Tell the sweeper a pruned run is pruned (optuna.TrialPruned), not complete.

    Raises:
        optuna.TrialPruned: the run was stopped by the pruner.
    """
    epoch = result.get("pruned_at_epoch")
    if epoch is not None:
        import optuna

        raise optuna.TrialPruned(f"pruned after epoch {epoch}; run directory {result.get('run_dir')}")
