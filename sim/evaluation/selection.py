"""Which epoch is best: the rule best.pt follows, and reports that name a run's best epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sim.core.config import to_dict
from sim.core.errors import ConfigError
from sim.core.labels import METRIC_MODES


def monitor_mode(monitor: str, mode: str) -> str:
    """The direction `mode` names; `auto` is the metric's own (min for losses and the miss rate)."""
    if mode == "auto":
        return METRIC_MODES.get(monitor, "max")
    if mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r}: expected auto, min or max")
    return mode


class BestEpochRule:
    """Which epoch best.pt holds: the monitor decides, but only among epochs that meet the floors.

    A monitor alone can crown a useless model: risk_high_recall is 1.0 for an epoch that calls every
    scene "high". So an epoch counts only if each `checkpoint.min_metrics` floor holds (val metric
    >= floor; an undefined metric fails it; a null floor is no floor). Among the epochs that count,
    the better monitor wins, then the better tie-breaker, then the earlier epoch. An epoch that meets
    the floors always beats one that does not; until one does, best.pt holds the epoch closest to
    them (smallest summed shortfall, then the monitor), so a run still has a best.pt from its first
    epoch.

    The rank is a plain tuple (`key`), so the trainer stores it in the checkpoint and a resumed run
    compares against exactly the value it had.
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "auto",
        tie_breaker: str | None = None,
        min_metrics: Mapping[str, float] | None = None,
    ) -> None:
        self.monitor = str(monitor)
        self.mode = monitor_mode(self.monitor, str(mode))
        self.tie_breaker = str(tie_breaker) if tie_breaker else None
        self.min_metrics = {str(k): float(v) for k, v in (min_metrics or {}).items() if v is not None}

    @classmethod
    def from_config(cls, checkpoint: Mapping[str, Any]) -> BestEpochRule:
        """From the `checkpoint` config node (or any mapping with its keys)."""
        return cls(
            checkpoint.get("monitor", "risk_high_recall"),
            checkpoint.get("mode", "auto"),
            checkpoint.get("tie_breaker"),
            to_dict(checkpoint.get("min_metrics")),
        )

    def _signed(self, metrics: Mapping[str, Any], name: str | None, mode: str) -> float:
        v = metrics.get(name) if name else None
        return -math.inf if v is None else (1.0 if mode == "max" else -1.0) * float(v)

    def shortfalls(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The floors this epoch misses, and by how much (inf where the metric is undefined)."""
        out = {}
        for name, floor in self.min_metrics.items():
            v = metrics.get(name)
            if v is None or float(v) < floor:
                out[name] = math.inf if v is None else floor - float(v)
        return out

    def key(self, metrics: Mapping[str, Any]) -> tuple[float, float, float]:
        """Sortable rank of an epoch's val metrics: higher is better."""
        missed = self.shortfalls(metrics)
        monitor = self._signed(metrics, self.monitor, self.mode)
        if missed:
            return 0.0, -sum(missed.values()), monitor
        tie = self._signed(metrics, self.tie_breaker, monitor_mode(self.tie_breaker or "", "auto"))
        return 1.0, monitor, tie

    def judge(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        best_key: Sequence[float] | None,
        best_epoch: int,
        best_metrics: Mapping[str, Any] | None,
    ) -> tuple[bool, tuple[float, ...], str]:
        """Whether this epoch becomes best, its key, and a sentence saying why (for the log).

        Args:
            best_key, best_epoch: the best so far (None / 0 before the first epoch).
            best_metrics: that epoch's val metrics, for the sentence (None when not at hand).
        """
        key = self.key(metrics)
        wins = best_key is None or best_epoch == 0 or key > tuple(best_key)
        return wins, key, self._why(epoch, metrics, wins, key, best_key, best_epoch, best_metrics or {})

    def _why(
        self,
        epoch: int,
        m: Mapping[str, Any],
        wins: bool,
        key: tuple[float, ...],
        best_key: Sequence[float] | None,
        best_epoch: int,
        best: Mapping[str, Any],
    ) -> str:
        missed = self.shortfalls(m)
        floors = ", ".join(
            f"{name} {_fmt(m.get(name))} {'<' if name in missed else '>='} {floor:g}"
            for name, floor in self.min_metrics.items()
        )
        floors = f"{floors} required" if floors else "no checkpoint.min_metrics"
        now = f"{self.monitor} {_fmt(m.get(self.monitor))}"
        verdict = f"epoch {epoch} is {'best' if wins else 'not best'}"
        if best_key is None or best_epoch == 0:
            return f"{verdict} (the first epoch{', for now' if missed else ''}): {now}; {floors}"
        then = f"{_fmt(best.get(self.monitor))} of epoch {best_epoch}" if best else f"that of epoch {best_epoch}"
        if missed:
            if wins:
                return f"{verdict} for now: no epoch has met the floors yet and it comes closest ({floors})"
            return f"{verdict}: {now} vs {then}, but it misses the floors ({floors})"
        if not best_key[0]:
            return f"{verdict}: the first epoch to meet the floors; {now}; {floors}"
        if key[1] != best_key[1]:
            better = (">" if self.mode == "max" else "<") if wins else (">" if self.mode == "min" else "<")
            return f"{verdict}: {now} {better} {then}; {floors}"
        tie = self.tie_breaker
        decides = (
            f"{tie} {_fmt(m.get(tie))} vs {_fmt(best.get(tie)) if best else '?'} decides" if tie else "no tie-breaker"
        )
        return f"{verdict}: {now} ties {then}, {decides} (a full tie keeps the earlier epoch); {floors}"


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.4f}"
