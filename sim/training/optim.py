"""Optimizers and learning-rate schedules (config group `optim`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from sim.core.errors import ConfigError


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up to the base LR over `warmup_steps`, then a cosine decay to `min_lr_ratio` of it."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def adamw(
    params: Iterable[torch.nn.Parameter],
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    schedule: str = "none",
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> tuple[Optimizer, LRScheduler | None]:
    """AdamW over the trainable parameters, and its LR schedule.

    Args:
        params: the parameters that require grad (the trainer passes only those).
        total_steps: optimizer steps of the whole run (for the schedule).
        schedule: "none" (constant LR) or "cosine" (warm-up, then cosine decay).
        warmup_steps / warmup_ratio: warm-up length in steps, or as a fraction of total_steps.

    Returns:
        (optimizer, scheduler or None); the trainer steps the scheduler once per optimizer step.
    """
    if lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0")
    if weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={weight_decay} must be >= 0")
    opt = torch.optim.AdamW(
        list(params), lr=lr, weight_decay=weight_decay, betas=(float(betas[0]), float(betas[1])), eps=eps
    )
    if schedule in (None, "none", "constant"):
        return opt, None
    if schedule == "cosine":
        warm = int(warmup_steps) or round(warmup_ratio * total_steps)
        return opt, warmup_cosine(opt, total_steps, warm, min_lr_ratio)
    raise ConfigError(f"optim.schedule={schedule!r}: expected none or cosine")
