"""Which floating-point types are fast on this machine.

bf16 is only worth it where the hardware computes it natively: CUDA GPUs with bf16 support, or CPUs
with AMX / AVX512-BF16 units. On a CPU without them PyTorch emulates bf16 matmuls, which can be two
orders of magnitude slower than fp32, so "auto" must look at the hardware, not assume.
"""

from __future__ import annotations

import functools

import torch

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
    from sim.errors import ConfigError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name}: CUDA is not available on this machine")
    return device
