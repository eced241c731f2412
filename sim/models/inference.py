"""From logits to the decisions a person reads (`SimV0Model.predict_json`), and its input checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sim.core import labels as L
from sim.core.errors import DataError

INPUTS = ("vis_feats", "frames", "telemetry")


def model_input(key: str, value: Any, device: torch.device) -> Any:
    """`value` on `device`; the model inputs (`INPUTS`) also as tensors from NumPy arrays or lists.

    Raises:
        DataError: a model input that is not real numbers, naming its key.
    """
    if key not in INPUTS:
        return value.to(device) if torch.is_tensor(value) else value
    if torch.is_tensor(value):
        return value.to(device)
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"predict_json: batch[{key!r}] is {type(value).__name__} ({exc}); expected a "
            "tensor, a NumPy array or a nested list of numbers"
        ) from None
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"predict_json: batch[{key!r}] has dtype {t.dtype}; expected real numbers")
    return t.to(device)


def decisions(
    logits: Mapping[str, torch.Tensor], sample_ids: Sequence[Any] | None, risk_high_threshold: float | None
) -> list[dict[str, Any]]:
    """One decision per sample: label, id and class probabilities per head, and the confidence.

    With `risk_high_threshold`, risk is "high" whenever P(high) reaches it, else the arg-max.
    """
    probs = {h: torch.softmax(logits[f"{h}_logits"].float(), dim=-1).cpu() for h in L.HEADS}
    conf = torch.sigmoid(logits["confidence_logits"].float()).cpu()
    results = []
    for i in range(conf.shape[0]):
        item: dict[str, Any] = {"sample_id": None if sample_ids is None else str(sample_ids[i])}
        for head in L.HEADS:
            p = probs[head][i]
            idx = int(p.argmax())
            if head == "risk" and risk_high_threshold is not None and float(p[L.RISK_HIGH]) >= risk_high_threshold:
                idx = L.RISK_HIGH
            item[head] = {
                "label": L.LABELS[head][idx],
                "id": idx,
                "probs": {name: round(float(v), 6) for name, v in zip(L.LABELS[head], p, strict=True)},
            }
        item["confidence"] = round(float(conf[i]), 6)
        results.append(item)
    return results
