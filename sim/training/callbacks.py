"""What the trainer tells the outside world while it runs: loggers, early stopping and sweep pruning
plug in here instead of into the loop.

A callback overrides the hooks it needs. Hooks run on every rank (a callback that writes checks
`trainer.dist.is_main`); a hook may set `trainer.should_stop = True` to end training after the
current epoch (its checkpoints and metric lines are written first). `on_exception` is called by whoever
runs `fit` (`sim.training.train.train`) when training raises, so a callback can close what it opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the trainer imports this module; only type checkers need the reverse
    from sim.training.trainer import Trainer


@dataclass
class StepInfo:
    """One optimizer step. Tensors stay on the device: reading them (`.item()`) waits for the device,
    so a callback reads them only on the steps it logs."""

    global_step: int
    epoch: int
    losses: dict[str, torch.Tensor]  # loss, loss_risk, loss_reason, loss_action, loss_confidence, objective
    lr: float
    grad_norm: torch.Tensor | None  # the global norm before clipping (None where it was not computed)
    samples: int  # samples in this step on this rank
    seconds: float  # wall time since the previous step ended


class Callback:
    """Base class: every hook does nothing."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None:
        pass

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, train: dict[str, Any], val: dict[str, Any], is_best: bool
    ) -> None:
        pass

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        pass

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        pass
