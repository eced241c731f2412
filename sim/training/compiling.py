"""`training.compile`: true, false, or `auto`, which compiles only where the compile is repaid in the run.

Measured on a 2-core CPU with native bf16 (gpt2 architecture, batch 64): compiling costs about 36 s on
the first run and about 7 s once Inductor's cache holds the graphs. Against the library's eager
kernels it saved 3-12% of each step (elementwise work fused around the frozen LLM's matmuls); but the
compiled graph runs the library's matmuls, not the LLM's packed ones (`llm.packed_weights`, CPU bf16),
and against those it loses (`sim bench ... training.compile=true`: 332 samples/s, eager 360-390 on AMX).
`auto` therefore compiles when

- the device is CUDA (where fusion pays far more) and the LLM is not a toy (>= `MIN_PARAMS`), or
- on CPU, the LLM does not compute with packed weights, the run has at least `min_steps` optimizer
  steps (`training.compile_min_steps`) and the LLM is not a toy: below that the compile costs more
  than it saves,

and never under the anomaly or profiler debug modes (whose hooks a compiled graph would skip), nor where
no C++ compiler is installed (Inductor needs one on CPU). Inductor's cache lives in SIM's cache directory
(`$SIM_CACHE_DIR/inductor`, see sim/models/llm_cache.py) unless TORCHINDUCTOR_CACHE_DIR says otherwise,
so a second run of the same model does not pay the full compile again.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from sim.core.errors import ConfigError
from sim.models.llm_cache import cache_root
from sim.models.packed import has_packed_layers, packing_available
from sim.training.settings import TrainingSettings

log = logging.getLogger(__name__)

MIN_PARAMS = 50_000_000
UNCOMPILABLE_DEBUG = ("anomaly", "profiler")


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str


def has_cpp_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def resolve_compile(
    setting: bool | str,
    *,
    device: torch.device,
    llm_params: int,
    planned_steps: int,
    min_steps: int,
    debug_mode: str | None = None,
    cpp_compiler: bool | None = None,
    packed_weights: bool = False,
) -> CompileChoice:
    """Whether to torch.compile the model, and why (logged at start).

    Raises:
        ConfigError: `setting` is not true, false or auto.
    """
    if isinstance(setting, bool):
        return CompileChoice(setting, f"training.compile={str(setting).lower()}")
    if str(setting) != "auto":
        raise ConfigError(f"training.compile={setting!r}: expected true, false or auto")
    if debug_mode in UNCOMPILABLE_DEBUG:
        return CompileChoice(False, f"auto: off under debug={debug_mode}")
    if llm_params < MIN_PARAMS:
        return CompileChoice(False, f"auto: off for a small LLM ({llm_params:,} parameters < {MIN_PARAMS:,})")
    if device.type == "cuda":
        return CompileChoice(True, "auto: on (CUDA, a full-size LLM)")
    if packed_weights:
        return CompileChoice(
            False, "auto: off (the LLM computes with packed weights, which a compiled graph would not use)"
        )
    if not (has_cpp_compiler() if cpp_compiler is None else cpp_compiler):
        return CompileChoice(False, "auto: off (no C++ compiler for Inductor on CPU)")
    if planned_steps < min_steps:
        return CompileChoice(
            False,
            f"auto: off ({planned_steps} optimizer steps < training.compile_min_steps={min_steps}: "
            "the compile would cost more than it saves)",
        )
    return CompileChoice(True, f"auto: on ({planned_steps} optimizer steps >= training.compile_min_steps={min_steps})")


def choose_compile(
    cfg: DictConfig, settings: TrainingSettings, device: torch.device, llm: nn.Module, planned_steps: int
) -> CompileChoice:
    """`training.compile` resolved for a run (logged); when on, Inductor caches in SIM's cache directory."""
    debug = cfg.get("debug") or {}
    mode = "anomaly" if debug.get("anomaly") else "profiler" if debug.get("profiler") else None
    choice = resolve_compile(
        settings.compile,
        device=device,
        llm_params=sum(p.numel() for p in llm.parameters()),
        planned_steps=planned_steps,
        min_steps=settings.compile_min_steps,
        debug_mode=mode,
        packed_weights=computes_packed(llm, device),
    )
    if choice.enabled:
        use_sim_inductor_cache()
    log.info("torch.compile %s: %s", "on" if choice.enabled else "off", choice.reason)
    return choice


def computes_packed(llm: nn.Module, device: torch.device) -> bool:
    """The LLM's linear layers take their packed path here: packed layers (`llm.packed_weights`, GPT-2),
    bf16 weights, on a CPU where oneDNN computes bf16."""
    weights = next(llm.parameters()).dtype
    return has_packed_layers(llm) and device.type == "cpu" and weights == torch.bfloat16 and packing_available()


def use_sim_inductor_cache() -> None:
    """Point Inductor's on-disk cache at SIM's cache directory (an explicit TORCHINDUCTOR_CACHE_DIR wins)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
