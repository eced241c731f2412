"""Early stopping on `checkpoint.monitor` (`training.early_stopping.{patience,min_delta}`; off by default).

An epoch improves when its val monitor beats the best so far by more than `min_delta` (an undefined,
null value never does); training stops after `patience` epochs in a row without improvement. The
state is recomputed from the run's val history at every epoch end instead of being kept apart: the
history is what a resumed run restores from its metric files, so a resumed run stops exactly where
an uninterrupted one does, and a run that had stopped does not start training again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sim.core.errors import ConfigError
from sim.evaluation.selection import monitor_mode
from sim.training.callbacks import Callback

if TYPE_CHECKING:
    from sim.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class Standing:
    best: float | None  # the best monitor value so far
    best_epoch: int
    stale: int  # epochs since the last improvement


class EarlyStopping(Callback):
    """Args:
    monitor: the val metric (checkpoint.monitor).
    mode: "max" or "min" (checkpoint.mode, resolved).
    patience: epochs without improvement that end the run (>= 1).
    min_delta: how much better than the best so far counts as an improvement (>= 0).
    """

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"training.early_stopping.patience={patience!r} must be null (off) or an integer >= 1")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not math.isfinite(min_delta)
            or min_delta < 0
        ):
            raise ConfigError(f"training.early_stopping.min_delta={min_delta!r} must be a finite number >= 0")
        if mode not in ("max", "min"):
            raise ConfigError(f"early stopping mode {mode!r}: expected max or min")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, float(min_delta)
        self.stopped_epoch: int | None = None

    def standing(self, history: Sequence[dict[str, Any]]) -> Standing:
        """Where a run stands after the val records `history` (one per epoch, in order)."""
        state = Standing(None, 0, 0)
        for record in history:
            value = record.get(self.monitor)
            if value is not None and (state.best is None or self._improves(float(value), state.best)):
                state = Standing(float(value), int(record.get("epoch", 0)), 0)
            else:
                state.stale += 1
        return state

    def _improves(self, value: float, best: float) -> bool:
        return value > best + self.min_delta if self.mode == "max" else value < best - self.min_delta

    def on_fit_start(self, trainer: Trainer) -> None:
        history = trainer.history["val"]
        state = self.standing(history)
        if history and state.stale >= self.patience:
            self.stopped_epoch = int(history[-1].get("epoch", len(history)))
            trainer.should_stop = True
            log.info(
                "early stopping: by epoch %d the val history already meets the stopping rule (val %s not better "
                "than %s of epoch %d by more than %g for %d epochs); nothing left to train. Raise "
                "training.early_stopping.patience to go on",
                self.stopped_epoch,
                self.monitor,
                _fmt(state.best),
                state.best_epoch,
                self.min_delta,
                state.stale,
            )

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, train: dict[str, Any], val: dict[str, Any], is_best: bool
    ) -> None:
        state = self.standing(trainer.history["val"])
        if state.stale >= self.patience and epoch < trainer.epochs:
            self.stopped_epoch = epoch
            trainer.should_stop = True
            log.info(
                "early stopping after epoch %d of %d: val %s has not beaten %s (epoch %d) by more than "
                "min_delta=%g for %d epochs (training.early_stopping.patience=%d)",
                epoch,
                trainer.epochs,
                self.monitor,
                _fmt(state.best),
                state.best_epoch,
                self.min_delta,
                state.stale,
                self.patience,
            )


def build_early_stopping(cfg: DictConfig) -> list[EarlyStopping]:
    """`training.early_stopping` as a callback, or none when `patience` is null."""
    section = OmegaConf.select(cfg, "training.early_stopping")
    if section is None or section.get("patience") is None:
        return []
    monitor = str(cfg.checkpoint.monitor)
    mode = monitor_mode(monitor, str(OmegaConf.select(cfg, "checkpoint.mode", default="auto")))
    return [EarlyStopping(monitor, mode, section.patience, section.get("min_delta", 0.0))]


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"
