"""Which epoch is best: the rule best.pt follows, and reports that name a run's best epoch."""

from __future__ import annotations

import math
from typing import Any

from sim.core.errors import ConfigError


def monitor_mode(monitor: str, mode: str) -> str:
    if mode == "auto":
        return "min" if monitor.startswith("loss") else "max"
    if mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r}: expected auto, min or max")
    return mode


def rank_key(metrics: dict[str, Any], monitor: str, tie_breaker: str | None, mode: str) -> tuple[float, float]:
    """Sortable key (higher is better) of an epoch's val metrics; undefined values rank last."""
    sign = 1.0 if mode == "max" else -1.0

    def val(name: str | None, s: float) -> float:
        v = metrics.get(name) if name else None
        return -math.inf if v is None else s * float(v)

    return val(monitor, sign), val(tie_breaker, 1.0 if not (tie_breaker or "").startswith("loss") else -1.0)
