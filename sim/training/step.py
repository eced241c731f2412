"""The training step, in nanoGPT's order: autocast forward -> scaled backward -> unscale -> clip -> step ->
scaler update -> zero_grad(set_to_none=True) -> LR schedule step.

`train_step` is the one copy: the trainer runs it for every optimizer step, and `sim bench` times it
phase by phase through its `mark` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch

from sim.models.model import SimV0Model
from sim.training.guards import NonFiniteGuard

Batch = dict[str, Any]
# compute_losses' signature: (logits, batch, loss_weights, class_weights) -> {"objective", "loss", ...}
LossFn = Callable[[Any, Batch, Mapping[str, float], Any], dict[str, torch.Tensor]]
# (output, batch, losses or None for an empty batch, whether the loss was finite), after each backward
MicroHook = Callable[[Any, Batch, dict[str, torch.Tensor] | None, bool], None]


class MicroStep(torch.nn.Module):
    """The forward of one training micro-batch: the model's logits, and what DDP wraps.

    A batch whose samples were all refused (`data.on_bad_sample=skip`) comes out of the loader empty,
    and it still has to be a micro-step like the others: under DDP each optimizer step's backward is one
    gradient all-reduce on every rank, and a rank that sat one out would leave the others waiting.
    The model cannot run on no samples, so the output is then a zero that depends on every trainable
    parameter: its gradients are exactly zero (the batch adds nothing to any rank's update), and its
    backward runs DDP's all-reduce like any other.
    """

    def __init__(self, model: SimV0Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor] | torch.Tensor:
        if batch:
            return self.model(batch)
        return cast(torch.Tensor, sum(p.sum() for p in self.model.trainable_parameters())) * 0.0


@dataclass
class StepParts:
    """What one optimizer step touches. `forward` is the MicroStep, DDP-wrapped and compiled as configured;
    `ddp` is the DDP wrapper (None in a single process)."""

    model: SimV0Model
    forward: Callable[[Batch], Any]
    loss_fn: LossFn
    loss_weights: Mapping[str, float]
    class_weights: Mapping[str, torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler, or None
    scaler: torch.amp.GradScaler
    grad_clip: float  # max global grad norm; inf: measured, never clipped
    guard: NonFiniteGuard
    ddp: torch.nn.parallel.DistributedDataParallel | None = None


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor] | None  # of the step's last micro-batch (None: it was empty)
    grad_norm: torch.Tensor  # the global norm before clipping, left on the device
    lr: float  # the learning rate the step used (the scheduler has moved on since)
    last_batch: Batch


def train_step(
    parts: StepParts,
    batches: Iterator[Batch],
    count: int,
    divisor: int | None = None,
    on_micro: MicroHook | None = None,
    mark: Callable[[str], None] | None = None,
) -> StepResult:
    """One optimizer step over the next `count` micro-batches of `batches` (already on the device).

    Args:
        divisor: what each micro-batch's objective is divided by (default `count`; a resumed run whose
            grad_accum changed may start an epoch inside a group and still divide by the group's size).
        on_micro: called after each micro-batch's backward.
        mark: called with "data", "forward", "backward" and "optimizer" as each phase ends (for timing).
    """
    divisor = divisor or count
    losses, batch = None, {}
    for i in range(count):
        batch = next(batches)
        if mark:
            mark("data")
        # Gradients are all-reduced once per optimizer step, on its last micro-batch.
        with nullcontext() if parts.ddp is None or i == count - 1 else parts.ddp.no_sync():
            out = parts.forward(batch)  # under the model's own autocast
            # An empty batch (all its samples skipped) yields a zero, not logits: see MicroStep.
            losses = parts.loss_fn(out, batch, parts.loss_weights, parts.class_weights) if batch else None
            objective = out if losses is None else losses["objective"]
            if mark:
                mark("forward")
            parts.scaler.scale(objective / divisor).backward()
        if mark:
            mark("backward")
        # A NaN loss would void the epoch's mean; an empty batch has nothing to add to it.
        finite = losses is not None and parts.guard.observe_loss(objective)
        if on_micro:
            on_micro(out, batch, losses, finite)
    grad_norm, lr = optimizer_step(parts)
    if mark:
        mark("optimizer")
    return StepResult(losses, grad_norm, lr, batch)


def optimizer_step(parts: StepParts) -> tuple[torch.Tensor, float]:
    """Unscale, clip, step (unless the gradients are non-finite), zero_grad, schedule.

    Returns:
        The global gradient norm before clipping (on the device: reading it waits) and the step's LR.
    """
    params = parts.model.trainable_parameters()
    parts.scaler.unscale_(parts.optimizer)
    # Loggers want the norm even without clipping: an infinite bound measures it and scales by exactly 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, parts.grad_clip)
    lr = parts.optimizer.param_groups[0]["lr"]  # the scheduler moves it below
    # A NaN/inf gradient skips the step (counted; too many in a row stop the run).
    if parts.guard.should_step(params, grad_norm, parts.scaler):
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scheduler is not None:
        parts.scheduler.step()
    return grad_norm, lr
