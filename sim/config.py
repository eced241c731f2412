"""Checks of a composed config that run before anything heavy loads, naming the key that is wrong."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sim.errors import ConfigError
from sim.metrics import METRIC_NAMES


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} must be set (it is ??? in the config); pass it on the command line: {key}=...") from None


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for a config that cannot work. Cheap: reads the config only."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} must be set (it is ??? in the config); pass it on the command line: {key}=...")
    F, K = _get(cfg, "model.F"), _get(cfg, "model.K")
    if not isinstance(F, int) or F < 1:
        raise ConfigError(f"model.F={F!r} must be a positive integer")
    if not isinstance(K, int) or K < 1:
        raise ConfigError(f"model.K={K!r} must be a positive integer")
    if K > F:
        raise ConfigError(f"model.K={K} > model.F={F}: K visual tokens are segment means of F frames, so K <= F")
    epochs = _get(cfg, "training.epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"training.epochs={epochs!r} must be an integer >= 1")
    clip = _get(cfg, "training.grad_clip")
    if clip is not None and (not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"training.grad_clip={clip!r} must be null or >= 0")
    amp = _get(cfg, "training.amp")
    if amp not in ("auto", True, False):
        raise ConfigError(f"training.amp={amp!r}: expected auto, true or false")
    monitor = _get(cfg, "checkpoint.monitor")
    if monitor not in METRIC_NAMES:
        raise ConfigError(f"checkpoint.monitor={monitor!r}: expected one of {', '.join(METRIC_NAMES)}")
    names = _get(cfg, "objective")
    for name in [names] if isinstance(names, str) else list(names or []):
        if name not in METRIC_NAMES:
            raise ConfigError(f"objective={name!r}: expected metric names from {', '.join(METRIC_NAMES)}")
    for key in ("data.batch_size", "data.num_workers"):
        v = _get(cfg, key)
        if not isinstance(v, int) or v < (1 if key.endswith("batch_size") else 0):
            raise ConfigError(f"{key}={v!r} must be an integer >= {1 if key.endswith('batch_size') else 0}")
    cw = _get(cfg, "model.class_weights")
    if cw is not None and cw != "auto" and not isinstance(cw, DictConfig):
        raise ConfigError(f"model.class_weights={cw!r}: expected null, auto or {{risk: [...], reason: [...], action: [...]}}")
