"""Scan whole splits through the training validation, without training, and report what is in them.

    python -m sim check_data data=cached data.train_split_path=DIR/train data.val_split_path=DIR/val
    python -m sim check_data data=custom data.dataset_class_path=my_pkg.MyDataset ... split=train
    python -m sim check_data data=frames vision=tiny report=check.json

Per split: samples read, good and bad; counts per label; telemetry statistics per channel (mean,
std, min, max over finite values, and the count of non-finite ones); video statistics; duplicate
sample_ids; and the bad samples, each named by index and sample_id with the key and what was
expected (the same checks, and the same messages, as `data.on_bad_sample` during training).
Nothing heavy loads (no LLM, no encoder). Exit status 1 when a sample is bad, a split cannot be
opened or its shape disagrees with the config; 0 otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sim.core import labels as L
from sim.core.cli import CONF_DIR, fail_cleanly
from sim.core.config import check_data_config
from sim.core.errors import ConfigError, SimError
from sim.core.shapes import kind_fits, split_mismatches
from sim.data.dataset import open_split
from sim.data.validate import BadSample, SampleValidator

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class _Moments:
    """Running count, mean, std, min, max of finite values per channel, and non-finite counts."""

    def __init__(self, channels: int) -> None:
        self.n = np.zeros(channels)
        self.sum = np.zeros(channels)
        self.sumsq = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.nonfinite = np.zeros(channels, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """x: [rows, channels]."""
        x = x.astype(np.float64, copy=False)
        finite = np.isfinite(x)
        self.nonfinite += (~finite).sum(0)
        z = np.where(finite, x, 0.0)
        self.n += finite.sum(0)
        self.sum += z.sum(0)
        self.sumsq += (z * z).sum(0)
        self.min = np.minimum(self.min, np.where(finite, x, np.inf).min(0, initial=np.inf))
        self.max = np.maximum(self.max, np.where(finite, x, -np.inf).max(0, initial=-np.inf))

    def update_rows(self, v: torch.Tensor) -> None:
        """One channel over all values of v [B, ...], a sample at a time (a batch of raw frames in
        float64 at once could take gigabytes)."""
        for row in v:
            x = row.reshape(-1).double()
            finite = torch.isfinite(x)
            z = x[finite]
            self.nonfinite[0] += int((~finite).sum())
            if z.numel():
                self.n[0] += z.numel()
                self.sum[0] += float(z.sum())
                self.sumsq[0] += float((z * z).sum())
                self.min[0] = min(self.min[0], float(z.min()))
                self.max[0] = max(self.max[0], float(z.max()))

    def rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in range(self.n.size):
            n, nonfinite = self.n[c], int(self.nonfinite[c])
            if not n:
                out.append({"mean": None, "std": None, "min": None, "max": None, "nonfinite": nonfinite})
                continue
            mean = self.sum[c] / n
            std = math.sqrt(max(self.sumsq[c] / n - mean * mean, 0.0))
            out.append(
                {"mean": mean, "std": std, "min": float(self.min[c]), "max": float(self.max[c]), "nonfinite": nonfinite}
            )
        return out


def expected_shape(
    dataset: Any, video_key: str, F: int | None, dv: int | None
) -> tuple[tuple[int | None, ...], list[str]]:
    """The per-sample video shape to check against, and disagreements between the data and the config.

    The data's own shape (its first sample) is what samples are checked against, so a config that
    disagrees is reported once instead of refusing every sample.
    """
    use_cached = video_key == "vis_feats"
    want: tuple[int | None, ...] = (F, dv) if use_cached else (F, 3, None, None)
    try:
        data_shape = tuple(int(n) for n in dataset.video_shape())
    except Exception as exc:
        return want, [f"cannot read the per-sample video shape: {type(exc).__name__}: {exc}"]
    problems = split_mismatches(data_shape, F=F, dv=dv, use_cached=use_cached)
    return (data_shape if kind_fits(data_shape, use_cached) else want), problems


def scan_split(dataset: Any, validator: SampleValidator, batch_size: int = 64) -> dict[str, Any]:
    """Read every sample of `dataset` through `validator` and gather the report of one split."""
    n = len(dataset)
    tel = _Moments(len(L.TELEMETRY_FIELDS))
    video = _Moments(1)
    labels: dict[str, Counter[int]] = {h: Counter() for h in L.HEADS}
    ids: Counter[str] = Counter()
    bad: list[BadSample] = []
    bad_samples: set[int | None] = set()
    good = 0
    for lo in range(0, n, batch_size):
        checked = validator.check_dataset(dataset, range(lo, min(lo + batch_size, n)))
        bad.extend(checked.bad)
        bad_samples.update(b.index for b in checked.bad)
        if checked.batch is None or checked.good is None:  # no row could be read
            continue
        batch = checked.batch
        good += int(checked.good.sum())
        tel.update(batch["telemetry"].numpy())
        video.update_rows(batch[validator.video_key])
        for h in L.HEADS:
            lab = batch[f"{h}_id"]
            ok = (lab >= 0) & (lab < L.NUM_CLASSES[h])
            labels[h].update(lab[ok].tolist())
        ids.update(s for s in batch["sample_id"] if s is not None)
    by_key = Counter(b.key for b in bad)
    duplicates = {s: c for s, c in ids.items() if c > 1}
    vrow = video.rows()[0]
    return {
        "samples": n,
        "good": good,
        "bad": len(bad_samples),
        "bad_by_key": dict(by_key),
        "bad_samples": [
            {"index": b.index, "sample_id": b.sample_id, "key": b.key, "problem": b.problem, "message": b.describe()}
            for b in bad
        ],
        "labels": {h: {name: int(labels[h].get(i, 0)) for i, name in enumerate(L.LABELS[h])} for h in L.HEADS},
        "telemetry": dict(zip(L.TELEMETRY_FIELDS, tel.rows(), strict=True)),
        "video": {"key": validator.video_key, "shape": list(validator.video_shape), **vrow},
        "duplicate_sample_ids": len(duplicates),
        "duplicate_examples": sorted(duplicates)[:5],
    }


def check_data(cfg: DictConfig) -> dict[str, Any]:
    """Scan the split(s) `cfg.split` names; returns the report (see module docstring).

    Raises:
        ConfigError: the data config cannot work (a key is missing, an unknown split or policy).
    """
    missing = sorted(k for k in OmegaConf.missing_keys(cfg.data))
    if missing:
        raise ConfigError(
            f"data.{missing[0]} must be set (it is ??? in the config); "
            f"pass it on the command line: data.{missing[0]}=..."
        )
    check_data_config(cfg)
    which = str(cfg.split)
    if which not in (*SPLITS, "both"):
        raise ConfigError(f"split={which!r}: expected train, val or both")
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    use_cached = OmegaConf.select(cfg, "vision.kind", default="cached") == "cached"
    video_key = "vis_feats" if use_cached else "frames"
    F, dv = OmegaConf.select(cfg, "model.F"), OmegaConf.select(cfg, "model.dv")
    report: dict[str, Any] = {"data": cfg.data.dataset_class_path, "video_key": video_key, "splits": {}}
    for split in SPLITS if which == "both" else (which,):
        entry: dict[str, Any] = {"problems": []}
        report["splits"][split] = entry
        try:
            dataset = open_split(cfg.data, split, use_cached)
        except SimError as exc:
            entry["problems"].append(f"cannot open the split: {exc}")
            continue
        except Exception as exc:
            entry["problems"].append(f"cannot open the split: {type(exc).__name__}: {exc}")
            continue
        describe = getattr(dataset, "describe", None)
        entry["describe"] = describe() if callable(describe) else type(dataset).__name__
        shape, problems = expected_shape(dataset, video_key, F, dv)
        entry["problems"].extend(problems)
        validator = SampleValidator(video_key, shape, on_bad_sample="skip")
        entry.update(scan_split(dataset, validator, batch_size))
    report["ok"] = all(not e["problems"] and e.get("bad", 0) == 0 for e in report["splits"].values())
    return report


def _num(v: float | None, width: int = 10) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:{width}.4g}"


def format_report(report: dict[str, Any], max_listed: int = 20) -> str:
    """The report as a person reads it (the first `max_listed` bad samples of each split spelled out)."""
    lines = [f"check_data: {report['data']} ({report['video_key']})"]
    for split, e in report["splits"].items():
        lines.append("")
        lines.append(f"{split} split: {e.get('describe', '(not opened)')}")
        for p in e["problems"]:
            lines.append(f"  PROBLEM: {p}")
        if "samples" not in e:
            continue
        lines.append(f"  samples      {e['samples']} read, {e['good']} good, {e['bad']} bad")
        for h in L.HEADS:
            counts = e["labels"][h]
            lines.append(f"  {h:<12} " + " | ".join(f"{name} {c}" for name, c in counts.items()))
        lines.append(f"  telemetry    {'channel':<8}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}  non-finite")
        for name, row in e["telemetry"].items():
            stats = "".join(_num(row[k]) for k in ("mean", "std", "min", "max"))
            lines.append(f"               {name:<8}{stats}  {row['nonfinite']}")
        v = e["video"]
        shape = "[" + ", ".join("?" if n is None else str(n) for n in v["shape"]) + "]"
        lines.append(
            f"  {v['key']:<12} per sample {shape}; mean {_num(v['mean'], 0)}, std {_num(v['std'], 0)}, "
            f"min {_num(v['min'], 0)}, max {_num(v['max'], 0)}, non-finite {v['nonfinite']}"
        )
        if e["duplicate_sample_ids"]:
            examples = ", ".join(map(repr, e["duplicate_examples"]))
            lines.append(f"  duplicate sample_ids: {e['duplicate_sample_ids']} (e.g. {examples})")
        if e["bad"]:
            keys = ", ".join(f"{k} {c}" for k, c in sorted(e["bad_by_key"].items()))
            lines.append(f"  bad samples  {e['bad']} (problems by key: {keys})")
            for b in e["bad_samples"][:max_listed]:
                lines.append(f"    {b['message']}")
            if len(e["bad_samples"]) > max_listed:
                lines.append(
                    f"    ... and {len(e['bad_samples']) - max_listed} more (max_listed={max_listed}; "
                    "report=FILE.json lists every one)"
                )
    lines.append("")
    bad = {s: e.get("bad", 0) for s, e in report["splits"].items()}
    problems = sum(len(e["problems"]) for e in report["splits"].values())
    if report["ok"]:
        lines.append("result: OK, no bad samples")
    else:
        lines.append(
            f"result: {sum(bad.values())} bad samples ({', '.join(f'{s} {n}' for s, n in bad.items())})"
            + (f" and {problems} problem(s) above" if problems else "")
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="check_data")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        report = check_data(cfg)
    print(format_report(report, int(cfg.max_listed)))
    if cfg.report:
        path = Path(str(cfg.report))
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"report written to {path}")
    if not report["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
