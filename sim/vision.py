"""Frozen vision encoders (config group `vision`).

`cached` means no encoder: the data already holds per-frame features and dv comes from the data.
"""

from __future__ import annotations

from torch import nn


def cached(**spec: object) -> None:
    """The `vision=cached` option: features come precomputed, so there is no encoder to build."""
    return None


def feature_dim(encoder: nn.Module | None) -> int | None:
    """dv of an encoder, or None for cached features (dv then comes from the data)."""
    return None if encoder is None else int(encoder.dv)


def from_spec(spec: dict | None) -> nn.Module | None:
    """Rebuild a frozen encoder from the spec a checkpoint stores (`vision` metadata)."""
    if not spec or spec.get("kind", "cached") == "cached":
        return None
    from sim.errors import ConfigError

    raise ConfigError(f"unknown vision encoder kind {spec.get('kind')!r}")
