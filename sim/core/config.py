"""Checks of a composed config that run before anything heavy loads, naming the key that is wrong."""

from __future__ import annotations

import errno
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sim.core import labels as L
from sim.core.errors import ConfigError
from sim.core.labels import DEFAULT_LOSS_WEIGHTS, METRIC_NAMES, METRICS
from sim.core.precision import DTYPES
from sim.core.shapes import check_frames_and_tokens

ON_BAD_SAMPLE = ("error", "skip")
# Data options whose video kind is fixed: (dataset class, what it yields).
FEATURES_ONLY = {"sim.data.synthetic.SyntheticSimDataset"}
FRAMES_ONLY = {"sim.data.synthetic_frames.SyntheticFramesDataset"}
CACHED_SPLIT = "sim.data.dataset.CachedSplitDataset"
AMP_DTYPES = ("auto", *DTYPES)
# A floor is a minimum: on a lower-is-better metric (losses, the miss rate) it would favour worse epochs.
FLOOR_METRICS = tuple(m.name for m in METRICS if m.mode == "max")


# optim.schedule values (sim.training.optim builds them).
SCHEDULES = ("none", "constant", "cosine", "onecycle")


def to_dict(node: Any) -> dict[str, Any]:
    """A config mapping (or a plain mapping, or None for an empty one) as a resolved plain dict.

    Raises:
        ConfigError: the node is not a mapping.
    """
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def select_required(cfg: DictConfig, key: str, prefix: str = "") -> Any:
    """`cfg`'s value at `key` (None when absent).

    Raises:
        ConfigError: the value is ??? in the config; the message names `prefix + key` as users type it.
    """
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        name = prefix + key
        raise ConfigError(
            f"{name} must be set (it is ??? in the config); pass it on the command line: {name}=..."
        ) from None


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for a config that cannot work. Cheap: reads the config only."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} must be set (it is ??? in the config); pass it on the command line: {key}=...")
    check_frames_and_tokens(select_required(cfg, "model.F"), select_required(cfg, "model.K"))
    epochs = select_required(cfg, "training.epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"training.epochs={epochs!r} must be an integer >= 1")
    clip = select_required(cfg, "training.grad_clip")
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"training.grad_clip={clip!r} must be null or >= 0")
    amp = select_required(cfg, "training.amp")
    if amp not in ("auto", True, False):
        raise ConfigError(f"training.amp={amp!r}: expected auto, true or false")
    monitor = select_required(cfg, "checkpoint.monitor")
    if monitor not in METRIC_NAMES:
        raise ConfigError(f"checkpoint.monitor={monitor!r}: expected one of {', '.join(METRIC_NAMES)}")
    names = select_required(cfg, "objective")
    for name in [names] if isinstance(names, str) else list(names or []):
        if name not in METRIC_NAMES:
            raise ConfigError(f"objective={name!r}: expected metric names from {', '.join(METRIC_NAMES)}")
    for key in ("data.batch_size", "data.num_workers"):
        v = select_required(cfg, key)
        if not isinstance(v, int) or v < (1 if key.endswith("batch_size") else 0):
            raise ConfigError(f"{key}={v!r} must be an integer >= {1 if key.endswith('batch_size') else 0}")
    cw = select_required(cfg, "model.class_weights")
    if cw is not None and cw != "auto" and not isinstance(cw, DictConfig):
        raise ConfigError(
            f"model.class_weights={cw!r}: expected null, auto or {{risk: [...], reason: [...], action: [...]}}"
        )
    _check_model(cfg)
    _check_training(cfg)
    _check_optim(cfg)
    check_data_config(cfg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_model(cfg: DictConfig) -> None:
    for key in ("model.dv", "model.d"):
        v = OmegaConf.select(cfg, key)
        if v is not None and (not _is_int(v) or v < 1):
            raise ConfigError(f"{key}={v!r} must be null (read from the data / LLM) or a positive integer")
    for key, low in (("model.telemetry_hidden", 1), ("model.head_hidden", 0)):
        v = OmegaConf.select(cfg, key)
        if v is not None and (not _is_int(v) or v < low):
            raise ConfigError(f"{key}={v!r} must be an integer >= {low}")
    weights = OmegaConf.select(cfg, "model.loss_weights")
    if weights is not None:
        if not isinstance(weights, DictConfig):
            raise ConfigError(
                f"model.loss_weights={weights!r}: expected {{risk: 1.0, reason: 0.5, action: 1.0, confidence: 0.1}}"
            )
        for name, v in to_dict(weights).items():
            if name not in DEFAULT_LOSS_WEIGHTS:
                raise ConfigError(
                    f"model.loss_weights.{name}: unknown loss; expected {', '.join(DEFAULT_LOSS_WEIGHTS)}"
                )
            if not _is_number(v) or v < 0:
                raise ConfigError(f"model.loss_weights.{name}={v!r} must be a finite number >= 0")
        total = sum(float(weights.get(h, DEFAULT_LOSS_WEIGHTS[h])) for h in L.HEADS)
        if total <= 0:
            raise ConfigError("model.loss_weights: risk, reason and action are all 0, so nothing would be learned")
    cw = OmegaConf.select(cfg, "model.class_weights")
    if isinstance(cw, DictConfig):
        for head_key, values in cw.items():
            head = str(head_key)
            n = L.NUM_CLASSES.get(head)
            if n is None:
                raise ConfigError(f"model.class_weights.{head}: unknown head; expected {', '.join(L.HEADS)}")
            if not isinstance(values, ListConfig) or len(values) != n:
                raise ConfigError(
                    f"model.class_weights.{head}={values!r}: expected {n} numbers ({', '.join(L.LABELS[head])})"
                )
            if any(not _is_number(v) or v < 0 for v in values) or not any(v > 0 for v in values):
                raise ConfigError(
                    f"model.class_weights.{head}={list(values)!r}: expected finite numbers >= 0, not all 0"
                )


def _check_training(cfg: DictConfig) -> None:
    seed = OmegaConf.select(cfg, "training.seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"training.seed={seed!r} must be an integer")
    steps = OmegaConf.select(cfg, "training.max_nonfinite_steps", default=10)
    if not _is_int(steps) or steps < 1:
        raise ConfigError(f"training.max_nonfinite_steps={steps!r} must be an integer >= 1")
    device = OmegaConf.select(cfg, "training.device", default="auto")
    if device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(device)):
        raise ConfigError(f"training.device={device!r}: expected auto, cpu, cuda or cuda:N")
    amp_dtype = OmegaConf.select(cfg, "training.amp_dtype", default="bfloat16")
    if amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"training.amp_dtype={amp_dtype!r}: expected bfloat16 or float16")
    mode = OmegaConf.select(cfg, "checkpoint.mode", default="auto")
    if mode not in ("auto", "min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r}: expected auto, min or max")
    tie = OmegaConf.select(cfg, "checkpoint.tie_breaker")
    if tie is not None and tie not in METRIC_NAMES:
        raise ConfigError(f"checkpoint.tie_breaker={tie!r}: expected null or one of {', '.join(METRIC_NAMES)}")
    patience = OmegaConf.select(cfg, "training.early_stopping.patience")
    if patience is not None and (not _is_int(patience) or patience < 1):
        raise ConfigError(f"training.early_stopping.patience={patience!r} must be null (off) or an integer >= 1")
    min_delta = OmegaConf.select(cfg, "training.early_stopping.min_delta", default=0.0)
    if not _is_number(min_delta) or min_delta < 0:
        raise ConfigError(f"training.early_stopping.min_delta={min_delta!r} must be a finite number >= 0")
    floors = OmegaConf.select(cfg, "checkpoint.min_metrics")
    if floors is not None and not isinstance(floors, DictConfig):
        raise ConfigError(f"checkpoint.min_metrics={floors!r}: expected {{metric: floor, ...}} or null")
    for name, floor in to_dict(floors).items():
        if name not in FLOOR_METRICS:
            raise ConfigError(f"checkpoint.min_metrics.{name}: expected one of {', '.join(FLOOR_METRICS)}")
        if floor is not None and not _is_number(floor):
            raise ConfigError(f"checkpoint.min_metrics.{name}={floor!r} must be a finite number or null (no floor)")


def _check_optim(cfg: DictConfig) -> None:
    optim = OmegaConf.select(cfg, "optim")
    if not isinstance(optim, DictConfig):
        return
    lr = optim.get("lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        raise ConfigError(f"optim.lr={lr!r} must be a finite number > 0")
    for key in ("weight_decay", "warmup_steps", "eps"):
        v = optim.get(key)
        if v is not None and (not _is_number(v) or v < 0 or (key == "eps" and v == 0)):
            raise ConfigError(f"optim.{key}={v!r} must be a finite number {'> 0' if key == 'eps' else '>= 0'}")
    for key, hi in (("warmup_ratio", 1.0), ("min_lr_ratio", 1.0)):
        v = optim.get(key)
        if v is not None and (not _is_number(v) or not 0 <= v <= hi):
            raise ConfigError(f"optim.{key}={v!r} must be between 0 and {hi}")
    betas = optim.get("betas")
    if betas is not None and (
        not isinstance(betas, ListConfig) or len(betas) != 2 or any(not _is_number(b) or not 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optim.betas={betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    schedule = optim.get("schedule")
    if schedule is not None and schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")


def check_data_config(cfg: DictConfig) -> None:
    """The `data` group against itself and the vision option (also used by `python -m sim check_data`)."""
    data = OmegaConf.select(cfg, "data")
    if not isinstance(data, DictConfig):
        return
    policy = data.get("on_bad_sample", "error")
    if policy not in ON_BAD_SAMPLE:
        raise ConfigError(
            f"data.on_bad_sample={policy!r}: expected error (refuse a bad sample) or skip (drop and list it)"
        )
    kind = OmegaConf.select(cfg, "vision.kind", default="cached")
    cls = data.get("dataset_class_path")
    if cls in FEATURES_ONLY and kind != "cached":
        raise ConfigError(
            f"vision={kind} encodes raw frames but data.dataset_class_path={cls} yields cached features; "
            "use vision=cached, or a raw-frame data option (data=synthetic_frames, data=frames)"
        )
    if cls in FRAMES_ONLY and kind == "cached":
        raise ConfigError(
            f"vision=cached reads cached features but data.dataset_class_path={cls} yields raw frames; "
            "pick an encoder (vision=tiny, vision=resnet18, ...)"
        )
    if cls == CACHED_SPLIT:
        want, other = ("vis_feats.npy", "frames.npy") if kind == "cached" else ("frames.npy", "vis_feats.npy")
        for split in ("train", "val"):
            key = f"data.{split}_split_path"
            path = data.get(f"{split}_split_path")
            if path is None:
                raise ConfigError(f"{key} is null; a cached split needs the path of its directory")
            root = Path(str(path))
            if not root.is_dir():
                raise ConfigError(f"split directory not found: {root} ({key})")
            if not (root / want).is_file() and (root / other).is_file():
                hint = (
                    "pick an encoder (vision=tiny, vision=resnet18, ...) or cache its features "
                    "(python -m sim.commands.cache_features)"
                    if kind == "cached"
                    else "use vision=cached"
                )
                raise ConfigError(f"{key}={root} holds {other}, not the {want} that vision={kind} reads; {hint}")


def check_writable_dir(path: str | Path | None, key: str) -> Path:
    """Refuse an output directory that cannot be created or written, without creating it.

    The nearest existing ancestor must be a directory in which a file can be created (tested for
    real, so a read-only file system or a full disk shows here, not at the first checkpoint).

    Raises:
        ConfigError: naming the key, the path and the reason.
    """
    if path is None or str(path) == "":
        raise ConfigError(f"{key} is empty; expected a directory to write the run into")
    target = Path(str(path)).expanduser()
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}={target}: {probe} is a file, not a directory; choose another {key}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise ConfigError(f"{key}={target}: cannot write in {probe} ({reason}); choose a writable {key}") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={target}: {probe} is not writable; choose a writable {key}")
    return target
