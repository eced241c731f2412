"""The label and metric contract of SIM v0: label spaces (the order of each list is the class id),
metric names, default loss weights."""

from __future__ import annotations

RISK = ["none", "low", "medium", "high"]
REASON = ["human", "obstacle", "tight_space", "unknown"]
ACTION = ["continue", "slow", "stop", "reverse", "turn_left", "turn_right"]

LABELS: dict[str, list[str]] = {"risk": RISK, "reason": REASON, "action": ACTION}
HEADS = tuple(LABELS)  # ("risk", "reason", "action")
NUM_CLASSES = {k: len(v) for k, v in LABELS.items()}
RISK_HIGH = RISK.index("high")

TELEMETRY_FIELDS = ["ax", "ay", "az", "gx", "gy", "gz", "v", "w"]

# The per-epoch metrics every split logs (names fixed by the contract).
METRIC_NAMES = (
    "loss",
    "loss_risk",
    "loss_reason",
    "loss_action",
    "loss_confidence",
    "risk_high_recall",
    "risk_high_fn_rate",
    "action_accuracy",
    "macro_f1",
    "risk_f1_macro",
    "reason_f1_macro",
    "action_f1_macro",
)
DEFAULT_LOSS_WEIGHTS = {"risk": 1.0, "reason": 0.5, "action": 1.0, "confidence": 0.1}


def labels_json() -> dict[str, dict[str, str]]:
    """id -> name for every head, as written to export/labels.json."""
    return {head: {str(i): name for i, name in enumerate(names)} for head, names in LABELS.items()}
