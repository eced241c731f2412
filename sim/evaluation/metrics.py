"""Losses and per-epoch metrics.

Every metric derives from one confusion matrix per head (torchmetrics accumulates it, and syncs it
across processes), so precision, recall and F1 agree with each other and with evaluate.py's tables.

A metric that is undefined on a split is None (null in JSON) with a warning, never a silent 0 or 1:
risk_high_recall without any "high" sample; a macro-F1 over no class.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as Fn
from torchmetrics.classification import MulticlassConfusionMatrix

from sim.core import labels as L
from sim.core.labels import DEFAULT_LOSS_WEIGHTS, KEY_METRICS, METRIC_NAMES

log = logging.getLogger(__name__)


def compute_losses(
    logits: Mapping[str, torch.Tensor],
    batch: Mapping[str, Any],
    loss_weights: Mapping[str, float],
    class_weights: Mapping[str, torch.Tensor | None] | None = None,
    learned: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """L = w_risk*CE(risk) + w_reason*CE(reason) + w_action*CE(action), per-sample weighted.

    Each CE is the weighted mean sum(w_i * ce_i) / sum(w_i) over the batch, with optional class
    weights inside the CE. The confidence head's BCE (target: the action prediction is right) is
    returned apart as `loss_confidence`; it reads a detached state, so it changes only that head.

    Returns:
        {"loss", "loss_risk", "loss_reason", "loss_action", "loss_confidence", "objective"}:
        `objective` = loss + w_confidence * loss_confidence is what the optimizer minimizes; with
        `learned` (model.loss_weighting=learned: {head: L_h} -> weighted sum) the heads' part of the
        objective is `learned`'s, while `loss` stays the fixed-weight sum every run reports.
    """
    w = batch["weight"].to(logits["risk_logits"].device, torch.float32)
    denom = w.sum().clamp_min(1e-12)
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=w.device)
    for head in L.HEADS:
        cw = None if not class_weights else class_weights.get(head)
        target = batch[f"{head}_id"].to(w.device)
        ce = Fn.cross_entropy(
            logits[f"{head}_logits"].float(), target, weight=None if cw is None else cw.to(w.device), reduction="none"
        )
        part = (ce * w).sum() / denom
        out[f"loss_{head}"] = part
        total = total + float(loss_weights.get(head, DEFAULT_LOSS_WEIGHTS[head])) * part
    out["loss"] = total
    correct = (logits["action_logits"].argmax(-1) == batch["action_id"].to(w.device)).float()
    bce = Fn.binary_cross_entropy_with_logits(logits["confidence_logits"].float(), correct, reduction="none")
    out["loss_confidence"] = (bce * w).sum() / denom
    heads = total if learned is None else learned({h: out[f"loss_{h}"] for h in L.HEADS})
    out["objective"] = (
        heads + float(loss_weights.get("confidence", DEFAULT_LOSS_WEIGHTS["confidence"])) * out["loss_confidence"]
    )
    return out


def per_class_table(cm: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix [true, pred]."""
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    rows = []
    for i, name in enumerate(names):
        p = float(tp[i] / predicted[i]) if predicted[i] > 0 else None
        r = float(tp[i] / support[i]) if support[i] > 0 else None
        f1 = None
        if support[i] > 0 or predicted[i] > 0:
            f1 = float(2 * tp[i] / (support[i] + predicted[i]))
        rows.append({"class": name, "precision": p, "recall": r, "f1": f1, "support": int(support[i])})
    return rows


def macro_f1(cm: torch.Tensor) -> float | None:
    """Mean F1 over the classes that occur in the targets or the predictions (None if none do)."""
    f1s = [row["f1"] for row in per_class_table(cm, [str(i) for i in range(cm.shape[0])]) if row["f1"] is not None]
    return sum(f1s) / len(f1s) if f1s else None


def metrics_from_confusion(cms: Mapping[str, torch.Tensor], split: str = "") -> dict[str, float | None]:
    """The contract's classification metrics from one confusion matrix per head."""
    out: dict[str, float | None] = {}
    for head in L.HEADS:
        out[f"{head}_f1_macro"] = macro_f1(cms[head])
    risk = cms["risk"].double()
    high_support = float(risk[L.RISK_HIGH].sum())
    if high_support > 0:
        recall = float(risk[L.RISK_HIGH, L.RISK_HIGH]) / high_support
        out["risk_high_recall"], out["risk_high_fn_rate"] = recall, 1.0 - recall
    else:
        out["risk_high_recall"] = out["risk_high_fn_rate"] = None
        msg = (
            f"risk_high_recall is undefined{' on ' + split if split else ''}: no sample has risk 'high'; logged as null"
        )
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    action = cms["action"].double()
    out["action_accuracy"] = float(action.diag().sum() / action.sum()) if action.sum() > 0 else None
    risk_f1, action_f1 = out["risk_f1_macro"], out["action_f1_macro"]
    out["macro_f1"] = None if risk_f1 is None or action_f1 is None else (risk_f1 + action_f1) / 2
    return out


def format_value(v: float | None) -> str:
    """A metric as the logs show it: 4 decimals, `null` where undefined."""
    return "null" if v is None else f"{v:.4f}"


def format_key_metrics(metrics: Mapping[str, Any]) -> str:
    """`name value` of each key metric of the contract (`sim.core.labels.METRICS`), two spaces apart."""
    return "  ".join(f"{name} {format_value(metrics.get(name))}" for name in KEY_METRICS)


def format_epoch_line(
    epoch: int, epochs: int, train: Mapping[str, Any], val: Mapping[str, Any], is_best: bool = False
) -> str:
    """The line the trainer logs after each epoch: losses, the val key metrics, the training rate."""
    return (
        f"epoch {epoch}/{epochs}  train loss {train['loss']:.4f} | val loss {val['loss']:.4f}  "
        f"{format_key_metrics(val)}  | {train['samples_per_s']:.0f} samples/s{'  (best)' if is_best else ''}"
    )


class EpochMetrics(torch.nn.Module):
    """Accumulates losses and confusion matrices over an epoch; `compute()` gives the contract metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.cms = torch.nn.ModuleDict({h: MulticlassConfusionMatrix(num_classes=n) for h, n in L.NUM_CLASSES.items()})
        self.reset()

    def _matrices(self) -> dict[str, MulticlassConfusionMatrix]:
        """The confusion matrix of each head (held in a ModuleDict, which types its items as Module)."""
        return {h: cast(MulticlassConfusionMatrix, cm) for h, cm in self.cms.items()}

    def reset(self) -> None:
        for cm in self._matrices().values():
            cm.reset()
        self.loss_sums: dict[str, float] = {}
        self.weight_sum = 0.0
        self.samples = 0

    @torch.no_grad()
    def update(
        self, logits: Mapping[str, torch.Tensor], batch: Mapping[str, Any], losses: Mapping[str, torch.Tensor]
    ) -> None:
        w = float(batch["weight"].sum())
        for k, v in losses.items():
            if k.startswith("loss"):
                self.loss_sums[k] = self.loss_sums.get(k, 0.0) + float(v) * w
        self.weight_sum += w
        self.samples += int(batch["weight"].shape[0])
        cms = self._matrices()
        for head in L.HEADS:
            preds = logits[f"{head}_logits"].detach().argmax(-1).cpu()
            cms[head].update(preds, batch[f"{head}_id"].cpu())

    def state(self) -> dict[str, Any]:
        """What this process has accumulated, as plain floats and tensors: it can be checkpointed
        (a partial epoch), summed over processes, and added back with `merge`."""
        loss_keys = [k for k in METRIC_NAMES if k.startswith("loss")]
        return {
            "loss_sums": {k: float(self.loss_sums.get(k, 0.0)) for k in sorted(set(loss_keys) | set(self.loss_sums))},
            "weight_sum": float(self.weight_sum),
            "samples": int(self.samples),
            "confusion": {h: cm.confmat.detach().cpu().clone() for h, cm in self._matrices().items()},
        }

    def merge(self, state: Mapping[str, Any]) -> None:
        """Add a `state()` to what is accumulated (resuming a partial epoch from its checkpoint)."""
        for k, v in state["loss_sums"].items():
            self.loss_sums[k] = self.loss_sums.get(k, 0.0) + float(v)
        self.weight_sum += float(state["weight_sum"])
        self.samples += int(state["samples"])
        for h, cm in self._matrices().items():
            cm.merge_state({"confmat": state["confusion"][h].to(cm.confmat.device, cm.confmat.dtype)})

    def confusion(self) -> dict[str, torch.Tensor]:
        return {h: cm.compute().cpu() for h, cm in self._matrices().items()}

    def compute(self, split: str = "") -> dict[str, float | None]:
        out: dict[str, float | None] = {
            k: (v / self.weight_sum if self.weight_sum > 0 else None) for k, v in sorted(self.loss_sums.items())
        }
        out.update(metrics_from_confusion(self.confusion(), split))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
