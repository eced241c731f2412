"""`evaluate(cfg)`: a checkpoint on one split, with the numbers and pictures a person reads.

The model is rebuilt from the checkpoint alone (`SimV0Model.from_checkpoint`: its metadata names the
LLM, dims, F, K and telemetry statistics); the config only says which data to read and where to write.
The metrics come from `sim.evaluation.metrics`, the code the trainer logs with, so an evaluation of the best
checkpoint on the val split reproduces the val line of its best epoch.

Written into the output directory (Hydra's run dir, `outputs/eval/<date>/<time>` by default):

    metrics.json            every contract metric, confidence_ece, the high-risk operating point,
                            the confusion matrices and where the numbers came from
    per_class.json/.md      precision, recall, F1 and support per class, for each head
    confusion_{risk,reason,action}.png
    calibration.png         reliability diagram of the confidence head
    predictions.jsonl       one line per sample: true and predicted labels, P(high), confidence
    evaluate.log
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint
from sim.core.config import select_required, to_dict
from sim.core.errors import CheckpointError, ConfigError
from sim.core.labels import DEFAULT_LOSS_WEIGHTS
from sim.core.precision import Precision, fast_bf16, named_precision, resolve_device
from sim.core.run import run_log
from sim.core.shapes import check_split_matches_model
from sim.data.dataset import SimData, SimDataset, open_split
from sim.evaluation.loop import evaluate_batches
from sim.evaluation.metrics import EpochMetrics, format_key_metrics, format_value, per_class_table
from sim.evaluation.plots import plot_confusion, plot_reliability
from sim.models.llm import SPEC_KEYS, describe, llm_spec
from sim.models.model import SimV0Model
from sim.models.serialization import checkpoint_precision

log = logging.getLogger(__name__)

# The LLM identity: what must agree between an `llm=...` override and the checkpoint. dtype may differ
# (the same weights computed in another precision); `arch` only matters for random-weight LLMs.
LLM_IDENTITY_KEYS = ("name_or_path", "pretrained", "gguf_file", "gguf_package", "init_seed")


# ---- calibration and the safety threshold ------------------------------------------------------
def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> tuple[float | None, list[dict[str, Any]]]:
    """Expected calibration error of a confidence score against the event it predicts.

    ECE = sum over equal-width bins of (bin count / N) * |accuracy in bin - mean confidence in bin|.

    Args:
        confidence: [N] probabilities in [0, 1].
        correct: [N] booleans, the event the confidence predicts (here: the action prediction is right).
        n_bins: number of equal-width bins over [0, 1]; 1.0 falls in the last one.

    Returns:
        (ece, bins): ece is None for an empty split; bins lists lo, hi, count, mean_confidence, accuracy.
    """
    if n_bins < 1:
        raise ConfigError(f"calibration_bins={n_bins} must be >= 1")
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, n_bins - 1)
    bins, ece, n = [], 0.0, confidence.size
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        entry: dict[str, Any] = {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": count,
            "mean_confidence": None,
            "accuracy": None,
        }
        if count:
            entry["mean_confidence"] = float(confidence[mask].mean())
            entry["accuracy"] = float(correct[mask].mean())
            ece += count / n * abs(entry["accuracy"] - entry["mean_confidence"])
        bins.append(entry)
    return (ece if n else None), bins


def risk_high_operating_point(
    p_high: np.ndarray, argmax_high: np.ndarray, is_high: np.ndarray, target_recall: float
) -> dict[str, Any]:
    """The largest P(high) threshold whose high-risk recall reaches `target_recall`, and its precision.

    The rule is the one `predict_json(risk_high_threshold=t)` applies: a sample is "high" when
    P(high) >= t or when "high" is the arg-max anyway. t = 1.0 leaves the arg-max decisions as they
    are, so when those already reach the target, the threshold costs nothing.

    Args:
        p_high: [N] P(risk = high). argmax_high: [N] bool, the arg-max is high. is_high: [N] bool, truth.
        target_recall: in (0, 1].

    Returns:
        {"target_recall", "threshold", "recall", "precision", "predicted_high", "argmax_recall",
         "argmax_precision"}; all but target_recall are None when no sample is "high" (with a warning).
    """
    if not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"risk_high_target_recall={target_recall} must be in (0, 1]")
    p_high = np.asarray(p_high, dtype=np.float64)
    argmax_high = np.asarray(argmax_high, dtype=bool)
    is_high = np.asarray(is_high, dtype=bool)
    out: dict[str, Any] = {
        "target_recall": float(target_recall),
        "threshold": None,
        "recall": None,
        "precision": None,
        "predicted_high": None,
        "argmax_recall": None,
        "argmax_precision": None,
    }
    positives = int(is_high.sum())
    if positives == 0:
        msg = "the high-risk threshold is undefined: no sample of the split has risk 'high'; reported as null"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return out

    def rates(pred: np.ndarray) -> tuple[float, float | None, int]:
        tp = int((pred & is_high).sum())
        n_pred = int(pred.sum())
        return tp / positives, (tp / n_pred if n_pred else None), n_pred

    out["argmax_recall"], out["argmax_precision"], _ = rates(argmax_high)
    # Recall only grows as t falls; candidates are the scores of the high samples (and 1.0 = arg-max).
    candidates = np.unique(np.concatenate([[1.0], p_high[is_high]]))[::-1]
    for t in candidates:
        recall, precision, n_pred = rates((p_high >= t) | argmax_high)
        if recall >= target_recall - 1e-12:
            out.update(threshold=float(t), recall=recall, precision=precision, predicted_high=n_pred)
            break
    return out


# ---- config, checkpoint and data ---------------------------------------------------------------
def check_llm_override(llm_cfg: DictConfig | None, meta_llm: dict[str, Any], path: Path) -> None:
    """Refuse an `llm=...` that is not the LLM the checkpoint was trained with (its dtype does not
    count: the precision is the checkpoint's, or `precision=...`).

    Raises:
        CheckpointError: the override names another LLM.
    """
    if llm_cfg is None:
        return
    given = to_dict(llm_cfg)
    given.pop("_target_", None)
    given = llm_spec(**{k: v for k, v in given.items() if k in SPEC_KEYS})
    keys = list(LLM_IDENTITY_KEYS) + ([] if meta_llm.get("pretrained", True) else ["arch"])
    differ = [k for k in keys if given.get(k) != meta_llm.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {given.get(k)!r} given, {meta_llm.get(k)!r} in the checkpoint" for k in differ)
        raise CheckpointError(
            f"checkpoint {path} was trained with LLM {describe(meta_llm)}, but this run asks for {describe(given)} "
            f"({detail}). The heads only work with the LLM they were trained on: drop the llm=... override "
            "(the checkpoint names its LLM) or evaluate a checkpoint trained with that LLM."
        )


def check_data_matches(dataset: SimDataset, meta: dict[str, Any], split: str, path: Path) -> None:
    """The split's samples must have the shape the checkpoint's model reads.

    Raises:
        DataError: F or dv (or the frame layout) differs from the checkpoint's.
    """
    check_split_matches_model(
        dataset.video_shape(),
        F=int(meta["F"]),
        dv=int(meta["dv"]),
        use_cached=bool(meta.get("use_cached_vis_feats", True)),
        what=f"the {split} split ({dataset.describe()})",
        checkpoint=path,
    )


def split_for_checkpoint(cfg: DictConfig, meta: dict[str, Any], split: str, path: str | Path) -> SimDataset:
    """The split of `cfg.data` the checkpoint is evaluated on, checked against its F and dv.

    The data options read model.F (`${model.F}`): it is set to the checkpoint's F unless typed.

    Raises:
        ConfigError: a typed model.F that differs. DataError: samples of another shape.
    """
    F_cfg = OmegaConf.select(cfg, "model.F")
    if F_cfg is not None and int(F_cfg) != int(meta["F"]):
        raise ConfigError(f"model.F={F_cfg} but checkpoint {path} was trained with F={meta['F']}; leave model.F unset")
    OmegaConf.update(cfg, "model.F", int(meta["F"]), force_add=True)
    dataset = open_split(cfg.data, split, bool(meta.get("use_cached_vis_feats", True)))
    check_data_matches(dataset, meta, split, Path(path))
    return dataset


def split_loader(data_cfg: DictConfig, dataset: SimDataset, batch_size: int | None = None) -> DataLoader:
    """An in-order loader over one split, batched (and its samples checked) as the trainer's are."""
    # SimData batches a split; the evaluated split stands in for both of its splits.
    data = SimData(
        train=dataset,
        val=dataset,
        batch_size=int(batch_size or data_cfg.get("batch_size", 64)),
        num_workers=int(data_cfg.get("num_workers", 0)),
        pin_memory=bool(data_cfg.get("pin_memory", False)),
    )
    if "on_bad_sample" in data_cfg:
        data.on_bad_sample = str(data_cfg.on_bad_sample)
    return data.loader("val", shuffle=False)


def loss_settings(
    ckpt: dict[str, Any], device: torch.device
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """Loss and class weights the run trained with (from the config stored beside the weights), so the
    losses reported here are the ones its val log shows. Classification metrics do not depend on them."""
    model_cfg = ((ckpt.get("config") or {}).get("model") or {}) if isinstance(ckpt.get("config"), dict) else {}
    loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(model_cfg.get("loss_weights") or {})}
    spec = model_cfg.get("class_weights")
    class_weights = None
    if isinstance(spec, dict):
        class_weights = {
            h: torch.tensor(v, dtype=torch.float32, device=device) for h, v in spec.items() if h in L.HEADS
        }
    elif spec == "auto":
        log.warning(
            "the run trained with class_weights=auto (from its train split); the losses here are computed without "
            "class weights and will differ from its logged val losses (the classification metrics do not)"
        )
    return loss_weights, class_weights


# ---- the evaluation ----------------------------------------------------------------------------
def run_model(
    model: SimV0Model,
    loader: DataLoader,
    device: torch.device,
    loss_weights: dict[str, float],
    class_weights: dict[str, torch.Tensor] | None,
    split: str,
    progress_bar: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Run the model over a loader through the trainer's own evaluation loop, in the model's precision.

    Returns:
        (metrics, confusion matrices per head, per-sample arrays: probs per head, confidence, labels,
        sample_id).
    """
    model.eval()
    tracker = EpochMetrics()
    probs: dict[str, list[torch.Tensor]] = {h: [] for h in L.HEADS}
    labels: dict[str, list[torch.Tensor]] = {h: [] for h in L.HEADS}
    conf: list[torch.Tensor] = []
    ids: list[str | None] = []

    def keep(logits: Any, batch: Any) -> None:
        for h in L.HEADS:
            probs[h].append(torch.softmax(logits[f"{h}_logits"].float(), -1).cpu())
            labels[h].append(batch[f"{h}_id"].cpu())
        conf.append(torch.sigmoid(logits["confidence_logits"].float()).cpu())
        batch_ids = batch.get("sample_id")
        n = batch["telemetry"].shape[0]
        ids.extend([None] * n if batch_ids is None else [None if s is None else str(s) for s in batch_ids])

    t0 = time.perf_counter()
    evaluate_batches(
        model,
        loader,
        device,
        tracker,
        loss_weights,
        class_weights,
        on_batch=keep,
        desc=f"evaluate {split}",
        progress_bar=None if progress_bar else False,
    )
    elapsed = time.perf_counter() - t0
    metrics = tracker.compute(split)
    metrics["samples_per_s"] = tracker.samples / max(elapsed, 1e-9)
    arrays = {
        "probs": {h: torch.cat(v).numpy() for h, v in probs.items()},
        "labels": {h: torch.cat(v).numpy() for h, v in labels.items()},
        "confidence": torch.cat(conf).numpy(),
        "sample_id": ids,
    }
    return metrics, tracker.confusion(), arrays


def per_class_markdown(tables: dict[str, list[dict[str, Any]]], title: str) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = [
        f"# Per-class metrics: {title}",
        "",
        "Precision, recall and F1 per class; `-` where undefined (no sample of the class, or none predicted).",
        "",
    ]
    for head, rows in tables.items():
        lines += [f"## {head}", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['class']} | {fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['f1'])} | {r['support']} |"
            for r in rows
        ]
        lines.append("")
    return "\n".join(lines)


def write_predictions(path: Path, arrays: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, sid in enumerate(arrays["sample_id"]):
            rec: dict[str, Any] = {"sample_id": sid}
            for h in L.HEADS:
                t, p = int(arrays["labels"][h][i]), int(arrays["probs"][h][i].argmax())
                rec[h] = {
                    "true": L.LABELS[h][t],
                    "pred": L.LABELS[h][p],
                    "correct": t == p,
                    "p_pred": round(float(arrays["probs"][h][i][p]), 6),
                }
            rec["p_high"] = round(float(arrays["probs"]["risk"][i][L.RISK_HIGH]), 6)
            rec["confidence"] = round(float(arrays["confidence"][i]), 6)
            fh.write(json.dumps(rec) + "\n")


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def evaluate(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` on `cfg.split` of `cfg.data` and write the report into `out_dir`.

    Returns:
        The content of metrics.json.

    Raises:
        ConfigError, DataError, LLMLoadError, CheckpointError: bad input, with a message naming it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / "evaluate.log", log, "evaluation failed"):
        return _evaluate(cfg, out)


@dataclass(frozen=True)
class _Request:
    """What the config asks for: which checkpoint on which split, where, in which precision."""

    path: Path
    split: str
    target_recall: float
    device: torch.device
    precision: Precision | None  # None: the checkpoint's own
    precision_name: Any  # as typed, for the log

    @classmethod
    def from_config(cls, cfg: DictConfig) -> _Request:
        path = Path(str(select_required(cfg, "checkpoint")))
        split = str(select_required(cfg, "split"))
        if split not in ("train", "val"):
            raise ConfigError(f"split={split!r}: expected train or val")
        target = float(select_required(cfg, "risk_high_target_recall"))
        if not 0.0 < target <= 1.0:
            raise ConfigError(f"risk_high_target_recall={target} must be in (0, 1]")
        override = cfg.get("precision")
        return cls(
            path=path,
            split=split,
            target_recall=target,
            device=resolve_device(str(cfg.get("device", "auto"))),
            precision=None if override in (None, "checkpoint") else named_precision(override),
            precision_name=override,
        )


def _evaluate(cfg: DictConfig, out: Path) -> dict[str, Any]:
    req = _Request.from_config(cfg)
    ckpt = _load_checkpoint(req.path, cfg.get("llm"))
    meta = ckpt["metadata"]
    dataset = split_for_checkpoint(cfg, meta, req.split, req.path)
    log.info("data: %s", dataset.describe())
    model = _load_model(req, meta)
    loss_weights, class_weights = loss_settings(ckpt, req.device)
    loader = split_loader(cfg.data, dataset)
    metrics, cms, arrays = run_model(
        model, loader, req.device, loss_weights, class_weights, req.split, bool(cfg.get("progress_bar", True))
    )
    ece, bins = expected_calibration_error(
        arrays["confidence"], _action_correct(arrays), int(cfg.get("calibration_bins", 15))
    )
    probs, labels = arrays["probs"], arrays["labels"]
    op = risk_high_operating_point(
        probs["risk"][:, L.RISK_HIGH],
        probs["risk"].argmax(-1) == L.RISK_HIGH,
        labels["risk"] == L.RISK_HIGH,
        req.target_recall,
    )
    trained = ckpt.get("metrics")
    if not isinstance(trained, dict):
        trained = {}
    report: dict[str, Any] = {
        # epoch and lr are the checkpoint's; every other metric is measured on this split.
        "epoch": ckpt.get("epoch"),
        "lr": trained.get("lr"),
        **metrics,
        **_calibration_and_threshold(arrays, ece, op),
        "evaluation": {
            "checkpoint": str(req.path),
            "split": req.split,
            "data": dataset.describe(),
            # What was evaluated: with data.on_bad_sample=skip, fewer than the split holds.
            "num_samples": len(arrays["sample_id"]),
            "llm": describe(meta["llm"]),
            "device": str(req.device),
            "precision": model.precision.to_dict(),
            "precision_source": "checkpoint" if req.precision is None else "override",
            "loss_weights": loss_weights,
            "class_weights": None if class_weights is None else {h: v.tolist() for h, v in class_weights.items()},
        },
        "risk_high_operating_point": op,
        "calibration": {"target": "action prediction is right", "bins": bins},
        "confusion": {h: {"labels": L.LABELS[h], "matrix": cms[h].tolist()} for h in L.HEADS},
    }
    report = {k: _finite(v) for k, v in report.items()}
    _write_outputs(out, report, cms, arrays, write_predictions_file=bool(cfg.get("write_predictions", True)))
    _write_figures(out, cms, bins, ece, f"{req.path.name}, {req.split}")
    _log_summary(report, out)
    return report


def _load_checkpoint(path: Path, llm_cfg: DictConfig | None) -> dict[str, Any]:
    """The checkpoint, its LLM record checked against an `llm=...` override, and logged.

    Raises:
        CheckpointError: unreadable, without an LLM spec, or trained with another LLM than `llm_cfg`.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt["metadata"]
    if not isinstance(meta.get("llm"), dict):
        raise CheckpointError(
            f"checkpoint {path}: metadata.llm is {meta.get('llm')!r}, expected the LLM's spec (a dict)"
        )
    check_llm_override(llm_cfg, meta["llm"], path)
    log.info(
        "checkpoint %s: epoch %s, LLM %s, F=%s K=%s dv=%s d=%s",
        path,
        ckpt.get("epoch"),
        describe(meta["llm"]),
        meta["F"],
        meta["K"],
        meta["dv"],
        meta["d"],
    )
    return ckpt


def _load_model(req: _Request, meta: dict[str, Any]) -> SimV0Model:
    """The checkpoint's model on the device, warning where its logged metrics will not be reproduced
    exactly (another precision) or where the evaluation will be slow (bf16 emulated on a CPU)."""
    model = SimV0Model.from_checkpoint(req.path, device=req.device, precision=req.precision)
    trained_in = checkpoint_precision(meta, req.device)
    if req.precision is not None and req.precision != trained_in:
        log.warning(
            "precision=%s: computing in %s, not the %s the checkpoint was trained and validated in; "
            "its logged val metrics will not be reproduced exactly",
            req.precision_name,
            req.precision.name,
            trained_in.name,
        )
    elif model.precision.autocast == torch.bfloat16 and req.device.type == "cpu" and not fast_bf16(req.device):
        log.warning(
            "the checkpoint computes in bf16, which this CPU emulates: expect a slow evaluation "
            "(precision=fp32 is fast here, at the cost of exact agreement with the run's logged metrics)"
        )
    source = " (the checkpoint's)" if req.precision is None else " (precision=...)"
    log.info("precision %s%s", model.precision.name, source)
    return model


def _action_correct(arrays: dict[str, Any]) -> np.ndarray:
    """Per sample: the action prediction is right (the event the confidence head predicts)."""
    return arrays["probs"]["action"].argmax(-1) == arrays["labels"]["action"]


def _calibration_and_threshold(arrays: dict[str, Any], ece: float | None, op: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics.json entries of the confidence head and the high-risk operating point."""
    return {
        "confidence_ece": ece,
        "confidence_mean": float(arrays["confidence"].mean()),
        "risk_high_target_recall": op["target_recall"],
        "risk_high_threshold": op["threshold"],
        "risk_high_threshold_recall": op["recall"],
        "risk_high_threshold_precision": op["precision"],
        "risk_high_precision": op["argmax_precision"],
    }


def _write_outputs(
    out: Path,
    report: dict[str, Any],
    cms: dict[str, torch.Tensor],
    arrays: dict[str, Any],
    write_predictions_file: bool,
) -> None:
    """metrics.json, per_class.json/.md and (unless turned off) predictions.jsonl."""
    ev = report["evaluation"]
    tables = {h: per_class_table(cms[h], L.LABELS[h]) for h in L.HEADS}
    (out / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "per_class.json").write_text(json.dumps(tables, indent=2) + "\n")
    title = f"{ev['checkpoint']} on the {ev['split']} split ({ev['num_samples']} samples)"
    (out / "per_class.md").write_text(per_class_markdown(tables, title))
    if write_predictions_file:
        write_predictions(out / "predictions.jsonl", arrays)


def _write_figures(
    out: Path, cms: dict[str, torch.Tensor], bins: list[dict[str, Any]], ece: float | None, what: str
) -> None:
    # The numbers are on disk already; a figure that fails to draw must not lose them.
    try:
        for h in L.HEADS:
            plot_confusion(cms[h], L.LABELS[h], out / f"confusion_{h}.png", f"{h} confusion ({what})")
        plot_reliability(bins, ece, out / "calibration.png", f"confidence head calibration ({what})")
    except Exception as exc:
        log.warning("could not draw the figures (%s: %s); metrics.json is complete", type(exc).__name__, exc)


def _log_summary(report: dict[str, Any], out: Path) -> None:
    f = format_value
    log.info(
        "%s split, %d samples: loss %s  %s  confidence_ece %s",
        report["evaluation"]["split"],
        report["evaluation"]["num_samples"],
        f(report.get("loss")),
        format_key_metrics(report),
        f(report.get("confidence_ece")),
    )
    op = report["risk_high_operating_point"]
    if op["threshold"] is not None and op["threshold"] >= 1.0:
        log.info(
            "risk 'high' at recall >= %s: the arg-max already reaches it (recall %s, precision %s); threshold 1.0",
            op["target_recall"],
            f(op["recall"]),
            f(op["precision"]),
        )
    else:
        log.info(
            "risk 'high' at recall >= %s: threshold P(high) >= %s gives recall %s, precision %s "
            "(arg-max: recall %s, precision %s)",
            op["target_recall"],
            f(op["threshold"]),
            f(op["recall"]),
            f(op["precision"]),
            f(op["argmax_recall"]),
            f(op["argmax_precision"]),
        )
    log.info("report written to %s", out)
