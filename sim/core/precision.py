"""A run's compute precision, and which floating-point types are fast on this machine.

bf16 is only worth it where the hardware computes it natively: CUDA GPUs with bf16 support, or CPUs
with AMX / AVX512-BF16 units. On a CPU without them PyTorch emulates bf16 matmuls, which can be two
orders of magnitude slower than fp32, so "auto" must look at the hardware, not assume.

What "auto" picks differs between machines, so it is decided once, when a run starts, and then
travels with the weights (`Precision`, in every checkpoint): a checkpoint is evaluated, exported and
served in the precision it was trained and validated in, on any machine, unless told otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sim.core.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """Map a config string to a dtype; "auto" is bf16 where it is fast, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | None, key: str = "device") -> torch.device:
    """A config's device for a single process: `auto` is CUDA where present, else the CPU.

    Raises:
        ConfigError: CUDA named but not available (the message names `key`).
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name}: CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class Precision:
    """How a model computes: the dtype of its frozen backbone weights, and the autocast dtype of its
    forward pass (None: no autocast, every trainable module computes in fp32).

    The trainable modules always keep fp32 weights; autocast decides what their matmuls run in.
    """

    weights: torch.dtype = torch.float32
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        """A short label: fp32, bf16, or e.g. "bf16 weights, fp32 compute" for mixed cases."""
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        w = short.get(self.weights, dtype_name(self.weights))
        a = "fp32" if self.autocast is None else short.get(self.autocast, dtype_name(self.autocast))
        return w if w == a else f"{w} weights, {a} autocast"

    def context(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of a forward pass on `device_type` (a no-op without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)

    def to_dict(self) -> dict[str, str | None]:
        """Plain strings, as stored in checkpoints (loads with weights_only=True)."""
        return {
            "weights": dtype_name(self.weights),
            "autocast": None if self.autocast is None else dtype_name(self.autocast),
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Precision:
        autocast = spec.get("autocast")
        return cls(
            weights=resolve_dtype(spec.get("weights", "float32")),
            autocast=None if autocast in (None, "none", False) else resolve_dtype(autocast),
        )


# What `precision=...` overrides (evaluate, export, latency, the wrapper) may name.
NAMED_PRECISIONS = {
    "fp32": Precision(torch.float32, None),
    "float32": Precision(torch.float32, None),
    "bf16": Precision(torch.bfloat16, torch.bfloat16),
    "bfloat16": Precision(torch.bfloat16, torch.bfloat16),
}


def named_precision(name: str | Precision, key: str = "precision") -> Precision:
    """`fp32` or `bf16` (frozen weights and autocast alike) from a config or command line.

    Raises:
        ConfigError: an unknown name (the message names `key`).
    """
    if isinstance(name, Precision):
        return name
    try:
        return NAMED_PRECISIONS[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"{key}={name!r}: expected fp32 or bf16 (or leave it unset for the checkpoint's own)"
        ) from None


def resolve_precision(
    llm_dtype: str | torch.dtype | None, amp: Any, amp_dtype: str | None, device: torch.device | str
) -> Precision:
    """The one rule for `llm.dtype`, `training.amp` and `training.amp_dtype`.

    `auto` picks bf16 where `device` computes it natively and fp32 elsewhere, for the frozen weights
    (`llm.dtype`) and for autocast (`training.amp`) alike.

    Raises:
        ConfigError: an unknown value, or fp16 autocast off CUDA.
    """
    device = torch.device(device)
    try:
        weights = resolve_dtype(llm_dtype, device)
    except ValueError as exc:
        raise ConfigError(f"llm.dtype: {exc}") from None
    if amp == "auto":
        enabled, dtype = fast_bf16(device), torch.bfloat16
    elif isinstance(amp, bool):
        enabled = amp
        try:
            dtype = resolve_dtype(amp_dtype or "bfloat16", device)
        except ValueError as exc:
            raise ConfigError(f"training.amp_dtype: {exc}") from None
    else:
        raise ConfigError(f"training.amp={amp!r}: expected auto, true or false")
    if enabled and dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"training.amp_dtype={amp_dtype}: expected bfloat16 or float16")
    if enabled and dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("training.amp_dtype=float16 needs CUDA; on CPU use bfloat16")
    return Precision(weights=weights, autocast=dtype if enabled else None)
