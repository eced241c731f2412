"""The label and metric contract of SIM v0: label spaces (the order of each list is the class id),
metric names, default loss weights."""

from __future__ import annotations

from dataclasses import dataclass

RISK = ["none", "low", "medium", "high"]
REASON = ["human", "obstacle", "tight_space", "unknown"]
ACTION = ["continue", "slow", "stop", "reverse", "turn_left", "turn_right"]

LABELS: dict[str, list[str]] = {"risk": RISK, "reason": REASON, "action": ACTION}
HEADS = tuple(LABELS)  # ("risk", "reason", "action")
NUM_CLASSES = {k: len(v) for k, v in LABELS.items()}
RISK_HIGH = RISK.index("high")

TELEMETRY_FIELDS = ["ax", "ay", "az", "gx", "gy", "gz", "v", "w"]


@dataclass(frozen=True)
class Metric:
    """One per-epoch metric of the contract.

    Attributes:
        name: its fixed name in the metrics files and every logger.
        mode: "max" when higher is better, "min" when lower is (what checkpoint.mode=auto follows).
        key: one of the few a person reads first: the epoch log line, evaluate's summary, run comparisons.
        panel: title of the training-curves panel that draws it (metrics of one panel share a title).
    """

    name: str
    mode: str
    key: bool = False
    panel: str | None = None


# The per-epoch metrics every split logs, in the order they are listed and drawn. Adding a metric is
# an entry here and its computation in sim.evaluation.metrics.
METRICS: tuple[Metric, ...] = (
    Metric("loss", "min", panel="loss"),
    *(Metric(f"loss_{part}", "min", panel="loss per head") for part in (*HEADS, "confidence")),
    Metric("risk_high_recall", "max", key=True, panel="risk_high_recall"),
    Metric("risk_high_fn_rate", "min"),
    Metric("action_accuracy", "max", key=True, panel="action_accuracy"),
    Metric("macro_f1", "max", key=True, panel="macro_f1"),
    *(Metric(f"{head}_f1_macro", "max", panel="F1 macro per head") for head in HEADS),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
METRIC_MODES = {m.name: m.mode for m in METRICS}
KEY_METRICS = tuple(m.name for m in METRICS if m.key)
DEFAULT_LOSS_WEIGHTS = {"risk": 1.0, "reason": 0.5, "action": 1.0, "confidence": 0.1}


def labels_json() -> dict[str, dict[str, str]]:
    """id -> name for every head, as written to export/labels.json."""
    return {head: {str(i): name for i, name in enumerate(names)} for head, names in LABELS.items()}
