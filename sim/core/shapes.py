"""What a model of F frames and K visual tokens reads per sample, and whether a split's samples fit it.

The trainer, evaluate.py and `python -m sim check_data` ask the same questions before they run a
model on a split; the rules, and the messages that name the fix, live here once. The model's values
come either from the config (model.F, model.dv: the fix is a key to set) or from a checkpoint (its
F and dv are fixed: the fix is other data).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.core.errors import ConfigError, DataError

ENCODERS = "vision=tiny, vision=resnet18, ..."


def check_frames_and_tokens(F: object, K: object) -> None:
    """model.F and model.K: positive integers with K <= F (K visual tokens are segment means of F frames).

    Raises:
        ConfigError: naming the key that is wrong.
    """
    if not isinstance(F, int) or F < 1:
        raise ConfigError(f"model.F={F!r} must be a positive integer")
    if not isinstance(K, int) or K < 1:
        raise ConfigError(f"model.K={K!r} must be a positive integer")
    if K > F:
        raise ConfigError(f"model.K={K} > model.F={F}: K visual tokens are segment means of F frames, so K <= F")


def kind_fits(shape: Sequence[int], use_cached: bool) -> bool:
    """Whether samples of `shape` are what the model reads: features [F, dv], or raw frames [F, 3, H, W]."""
    return len(shape) == 2 if use_cached else len(shape) == 4 and int(shape[1]) == 3


def split_mismatches(
    shape: Sequence[int],
    *,
    F: int | None,
    use_cached: bool,
    dv: int | None = None,
    what: str = "the split",
    checkpoint: str | Path | None = None,
) -> list[str]:
    """Why samples of `shape` do not fit the model, one sentence per mismatch; [] when they fit.

    Args:
        shape: one sample's video as the split yields it.
        F, dv: the frames per sample and feature width the model reads (None: any).
        use_cached: the model reads cached features (vision=cached), else raw frames through an encoder.
        what: names the split in the messages.
        checkpoint: the checkpoint the model comes from; None when it comes from the config.

    Returns:
        Messages naming the fix. A sample of the wrong kind (frames for features or back) gives one.
    """
    shape = [int(n) for n in shape]
    src = None if checkpoint is None else f"checkpoint {checkpoint}"
    if not kind_fits(shape, use_cached):
        if use_cached:
            want = f"{src} reads features [F={F}, dv={dv}]" if src else "vision=cached reads features [F, dv]"
            fix = "" if src else f"; for raw frames [F, 3, H, W] pick an encoder ({ENCODERS})"
        else:
            want = (
                f"{src} reads raw frames [F={F}, 3, H, W]" if src else "a vision encoder reads raw frames [F, 3, H, W]"
            )
            fix = "" if src else "; for cached features [F, dv] use vision=cached"
        return [f"{what} yields {shape} per sample, but {want}{fix}"]
    problems = []
    if F is not None and shape[0] != F:
        fix = (
            f"{src} was trained with F={F}; evaluate on data with {F} frames per sample"
            if src
            else f"model.F={F}; set model.F={shape[0]}"
        )
        problems.append(f"{what} has F={shape[0]} frames per sample but {fix}")
    if use_cached and dv is not None and shape[1] != dv:
        fix = (
            f"{src} reads [F={F}, dv={dv}]; for data=synthetic pass data.dataset_kwargs.dv={dv}"
            if src
            else f"model.dv={dv}; leave model.dv unset"
        )
        problems.append(f"{what} has features {shape[1]} wide but {fix}")
    return problems


def check_split_matches_model(shape: Sequence[int], **fit: Any) -> None:
    """Refuse a split whose samples do not fit the model (arguments as `split_mismatches`).

    Raises:
        ConfigError: the model comes from the config, whose keys are to change.
        DataError: the model comes from a checkpoint, so the data is what is wrong.
    """
    problems = split_mismatches(shape, **fit)
    if problems:
        raise (ConfigError if fit.get("checkpoint") is None else DataError)(problems[0])
