"""LLM adaptation (`model.adaptation`): `frozen` (v0), or LoRA adapters through `peft` (`lora`).

With `lora`, low-rank adapters are injected into the LLM's `model.lora.target_modules` (null: peft's
default for the architecture, e.g. GPT-2's c_attn, Llama's q_proj and v_proj). The adapter weights are
the only LLM parameters that train: every other LLM weight stays frozen, which `check_frozen` asserts.
They stay float32 whatever the frozen weights compute in, are saved in checkpoints with the other
trainable weights, and `from_checkpoint` injects the same adapters before loading them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sim.core.errors import ConfigError

ADAPTATIONS = ("frozen", "lora")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def is_lora_param(name: str) -> bool:
    """True for a LoRA adapter weight (peft names them ...lora_A... and ...lora_B...)."""
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def lora_spec(adaptation: str, lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The plain-dict LoRA settings a checkpoint stores (None for a frozen LLM).

    Raises:
        ConfigError: an unknown adaptation, or LoRA settings that cannot work.
    """
    if adaptation == "frozen":
        return None
    if adaptation != "lora":
        raise ConfigError(f"model.adaptation={adaptation!r}: expected one of {', '.join(ADAPTATIONS)}")
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"model.lora has unknown keys {unknown}; expected {', '.join(LORA_KEYS)}")
    spec: dict[str, Any] = {
        "r": int(lora.get("r", 8)),
        "alpha": int(lora.get("alpha", 16)),
        "dropout": float(lora.get("dropout", 0.0)),
    }
    if spec["r"] < 1:
        raise ConfigError(f"model.lora.r={spec['r']}: the adapters' rank must be >= 1")
    if not 0.0 <= spec["dropout"] < 1.0:
        raise ConfigError(f"model.lora.dropout={spec['dropout']}: expected a probability in [0, 1)")
    targets = lora.get("target_modules")
    spec["target_modules"] = None if targets is None else [str(t) for t in targets]
    return spec


def inject_lora(llm: nn.Module, spec: Mapping[str, Any]) -> None:
    """Add LoRA adapters to `llm` in place; only the adapters require grad (float32, B = 0: the
    adapted LLM starts as the frozen one).

    Raises:
        ConfigError: target modules the LLM does not have.
    """
    from peft import LoraConfig, inject_adapter_in_model  # peft only for LoRA runs

    model_type = getattr(getattr(llm, "config", None), "model_type", None)
    config = LoraConfig(
        r=int(spec["r"]),
        lora_alpha=int(spec["alpha"]),
        lora_dropout=float(spec["dropout"]),
        target_modules=spec.get("target_modules"),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores its weight transposed
    )
    llm.requires_grad_(False)
    try:
        inject_adapter_in_model(config, llm)
    except ValueError as exc:
        raise ConfigError(f"model.lora.target_modules={spec.get('target_modules')}: {exc}") from None
    for name, p in llm.named_parameters():
        p.requires_grad_(is_lora_param(name))
        if is_lora_param(name):
            p.data = p.data.float()


def keep_lora_fp32(llm: nn.Module) -> None:
    """After the frozen weights were cast (`set_precision`), bring the adapters back to float32."""
    for name, p in llm.named_parameters():
        if is_lora_param(name) and p.dtype != torch.float32:
            p.data = p.data.float()


def lora_dropouts(llm: nn.Module) -> list[nn.Module]:
    """The adapters' dropout modules (they follow train/eval while the frozen LLM stays in eval)."""
    return [m for name, m in llm.named_modules() if name.endswith("lora_dropout.default")]
