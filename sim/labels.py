"""Label spaces of SIM v0. The order of each list is the class id."""

from __future__ import annotations

RISK = ["none", "low", "medium", "high"]
REASON = ["human", "obstacle", "tight_space", "unknown"]
ACTION = ["continue", "slow", "stop", "reverse", "turn_left", "turn_right"]

LABELS: dict[str, list[str]] = {"risk": RISK, "reason": REASON, "action": ACTION}
HEADS = tuple(LABELS)  # ("risk", "reason", "action")
NUM_CLASSES = {k: len(v) for k, v in LABELS.items()}
RISK_HIGH = RISK.index("high")

TELEMETRY_FIELDS = ["ax", "ay", "az", "gx", "gy", "gz", "v", "w"]


def labels_json() -> dict[str, dict[str, str]]:
    """id -> name for every head, as written to export/labels.json."""
    return {head: {str(i): name for i, name in enumerate(names)} for head, names in LABELS.items()}
