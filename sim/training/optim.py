"""Optimizers and learning-rate schedules (config group `optim`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from sim.core.config import SCHEDULES
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


LR_GROUPS = ("projector", "queries", "heads", "loss_weighting", "lora")


def param_groups(
    params: list[torch.nn.Parameter],
    groups: Mapping[str, list[torch.nn.Parameter]] | None,
    lr: float,
    lr_groups: Mapping[str, float | None] | None,
) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The optimizer's parameters: `params` as one group (v0), or one group per named part of the model
    where `lr_groups` gives any part its own learning rate (the others keep `lr`).

    Raises:
        ConfigError: an unknown group name, or a learning rate <= 0.
    """
    chosen = {k: v for k, v in (lr_groups or {}).items() if v is not None}
    unknown = sorted(set(chosen) - set(LR_GROUPS))
    if unknown:
        raise ConfigError(f"optim.lr_groups has unknown groups {unknown}; expected {', '.join(LR_GROUPS)}")
    bad = {k: v for k, v in chosen.items() if not float(v) > 0}
    if bad:
        raise ConfigError(f"optim.lr_groups {bad}: a learning rate must be > 0")
    if not chosen or groups is None:
        return params
    return [{"params": ps, "lr": float(chosen.get(name, lr)), "name": name} for name, ps in groups.items() if ps]


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
    lr_groups: Mapping[str, float | None] | None = None,
    groups: Mapping[str, list[torch.nn.Parameter]] | None = None,
) -> tuple[Optimizer, LRScheduler | None]:
    """AdamW over the trainable parameters, and its LR schedule.

    Args:
        params: the parameters that require grad (the trainer passes only those).
        total_steps: optimizer steps of the whole run (for the schedule).
        schedule: "none" (constant LR), "cosine" (warm-up, then cosine decay) or "onecycle" (torch's
            OneCycleLR: from lr/25 up to each group's lr over the warm-up, then annealed to lr/1e4).
        warmup_steps / warmup_ratio: warm-up length in steps, or as a fraction of total_steps.
        lr_groups: {projector, queries, heads, loss_weighting, lora: lr or null}: a learning rate of
            its own for a part of the model (null: `lr`); `groups` is the model's parameters by those
            names (`SimV0Model.param_groups`).

    Returns:
        (optimizer, scheduler or None); the trainer steps the scheduler once per optimizer step.
    """
    if lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0")
    if weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={weight_decay} must be >= 0")
    params = list(params)
    opt = torch.optim.AdamW(
        param_groups(params, groups, lr, lr_groups),
        lr=lr,
        weight_decay=weight_decay,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        # One fused kernel over all parameters where torch has one: on CPU, torch's default is a loop
        # over the tensors (`sim bench`'s optimizer phase, gpt2 at batch 64: 8.0 ms a step, 4.4 fused).
        fused=fusable(params) or None,
    )
    return opt, schedule_for(opt, schedule, total_steps, warmup_steps, warmup_ratio, min_lr_ratio)


def fusable(params: list[torch.nn.Parameter]) -> bool:
    """True where torch's fused AdamW runs: every parameter a floating-point tensor on CPU or CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def schedule_for(
    opt: Optimizer, schedule: str | None, total_steps: int, warmup_steps: int, warmup_ratio: float, min_lr_ratio: float
) -> LRScheduler | None:
    """The LR schedule `optim.schedule` names (None for a constant LR).

    Raises:
        ConfigError: an unknown schedule, or a OneCycle without a warm-up shorter than the run.
    """
    warm = int(warmup_steps) or round(warmup_ratio * total_steps)
    if schedule in (None, "none", "constant"):
        return None
    if schedule == "cosine":
        return warmup_cosine(opt, total_steps, warm, min_lr_ratio)
    if schedule == "onecycle":
        total = max(int(total_steps), 1)
        rise = int(warmup_steps) / total if warmup_steps else float(warmup_ratio)
        if not 0 < rise < 1:
            raise ConfigError(
                f"optim.schedule=onecycle needs a warm-up shorter than the run ({total} steps): "
                "set optim.warmup_ratio (e.g. 0.05) or optim.warmup_steps"
            )
        return OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=rise,
            cycle_momentum=False,  # AdamW's betas stay as configured
        )
    raise ConfigError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
