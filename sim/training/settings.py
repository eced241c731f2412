"""The `training:` config node as one typed value, read and checked once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sim.core.errors import ConfigError


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int
    seed: int
    device: str | None
    grad_clip: float | None  # max global grad norm; None: no clipping
    grad_accum: int  # micro-batches per optimizer step
    compile: bool | str  # true | false | auto (sim.training.compiling.resolve_compile)
    compile_min_steps: int
    progress_bar: bool
    max_nonfinite_steps: int
    resume: str | None  # auto | a checkpoint | a run directory; None: start fresh

    @classmethod
    def from_config(cls, training: Mapping[str, Any]) -> TrainingSettings:
        """From the `training` config node.

        Raises:
            ConfigError: training.grad_accum < 1.
        """
        grad_accum = int(training.get("grad_accum") or 1)
        if grad_accum < 1:
            raise ConfigError(f"training.grad_accum={grad_accum} must be >= 1")
        clip, device, resume = training.get("grad_clip"), training.get("device"), training.get("resume")
        return cls(
            epochs=int(training["epochs"]),
            seed=int(training["seed"]),
            device=None if device is None else str(device),
            grad_clip=float(clip) if clip else None,
            grad_accum=grad_accum,
            compile=_compile_setting(training.get("compile", "auto")),
            compile_min_steps=int(training.get("compile_min_steps", 1000)),
            progress_bar=bool(training.get("progress_bar", True)),
            max_nonfinite_steps=int(training.get("max_nonfinite_steps", 10)),
            resume=str(resume) if resume else None,
        )

    @property
    def clip_bound(self) -> float:
        """The norm bound for clip_grad_norm_: without clipping, an infinite one still measures the norm."""
        return math.inf if self.grad_clip is None else self.grad_clip


def _compile_setting(value: Any) -> bool | str:
    """`training.compile` as true, false or "auto" (also given as the strings true/false).

    Raises:
        ConfigError: any other value.
    """
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).lower()
    if text in ("true", "false"):
        return text == "true"
    if text != "auto":
        raise ConfigError(f"training.compile={value!r}: expected true, false or auto")
    return "auto"
