"""A model as a checkpoint holds it: metadata, the trainable state dict and its precision code, and the
rebuild from them that `SimV0Model.from_checkpoint` and `SimV0Model.from_pretrained` share.

The functions take the model class as an argument (`cls`), so this module needs nothing from
`sim.models.model`, which builds on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sim.core import labels as L
from sim.core.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from sim.core.errors import CheckpointError
from sim.core.precision import Precision, dtype_name, named_precision, resolve_precision
from sim.models import vision
from sim.models.llm import build_llm, describe
from sim.models.lora import is_lora_param
from sim.models.pretrained import read_pretrained, read_pretrained_config

if TYPE_CHECKING:
    from sim.models.model import SimV0Model

log = logging.getLogger(__name__)

# What a checkpoint's model_state_dict holds: the trainable modules, the telemetry statistics, and the
# precision code (the module's extra state).
# (The variants' modules, temporal_pool and loss_weighting, hold nothing in v0; LoRA adapters live in llm.)
TRAINABLE_MODULES = ("vis_proj", "tel_mlp", "query", "head_norm", "heads", "temporal_pool", "loss_weighting")
STAT_BUFFERS = ("tel_mean", "tel_std")
EXTRA_STATE = "_extra_state"


def is_trainable_key(key: str, stats: bool = False) -> bool:
    """True for a state-dict key a checkpoint stores: a trainable module's, a LoRA adapter's, and
    (with `stats`) the telemetry statistics and the precision code."""
    top = key.split(".")[0]
    if top in TRAINABLE_MODULES or (top == "llm" and is_lora_param(key)):
        return True
    return stats and top in (*STAT_BUFFERS, EXTRA_STATE)


# The precision as the state dict stores it: [weights, autocast] codes (0: no autocast).
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


def precision_code(precision: Precision) -> torch.Tensor:
    autocast = 0 if precision.autocast is None else _DTYPE_CODES[precision.autocast]
    return torch.tensor([_DTYPE_CODES[precision.weights], autocast], dtype=torch.uint8)


def precision_from_code(code: torch.Tensor) -> Precision:
    """Raises CheckpointError for a code no version of SIM writes."""
    dtypes = {v: k for k, v in _DTYPE_CODES.items()}
    values = [int(x) for x in code.flatten().tolist()]
    if len(values) != 2 or values[0] not in dtypes or (values[1] and values[1] not in dtypes):
        raise CheckpointError(
            f"model_state_dict[{EXTRA_STATE!r}] is {values}, not a SIM precision code [weights, autocast]"
        )
    return Precision(dtypes[values[0]], dtypes[values[1]] if values[1] else None)


def checkpoint_precision(meta: Mapping[str, Any], device: str | torch.device = "cpu") -> Precision:
    """The precision a checkpoint was trained and validated in.

    Checkpoints written before the precision was recorded hold only `llm.dtype`; their autocast is
    what `training.amp=auto` picks on this machine, as it did when they were evaluated before.
    """
    if isinstance(meta.get("precision"), Mapping):
        return Precision.from_dict(meta["precision"])
    return resolve_precision((meta.get("llm") or {}).get("dtype", "auto"), "auto", "bfloat16", device)


def check_state_dict(
    model: SimV0Model, own: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any], strict: bool
) -> None:
    """Refuse a state dict that does not fit `model` (whose full state dict is `own`).

    Raises:
        CheckpointError: keys missing or unexpected (strict), or shapes of another architecture.
    """
    expected = {k for k in own if is_trainable_key(k) or k.split(".")[0] in STAT_BUFFERS}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"state dict does not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint is of another architecture: {k} has shape {list(v.shape)} in the checkpoint, "
                f"this model (dv={model.dv}, d={model.d}) expects {list(own[k].shape)}"
            )


def model_metadata(model: SimV0Model) -> dict[str, Any]:
    """Everything needed to rebuild `model` without the config that trained it (plain types)."""
    llm_spec = dict(getattr(model.llm, "sim_spec", {}) or {})
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "dv": model.dv,
        "d": model.d,
        "F": model.F,
        "K": model.K,
        "use_cached_vis_feats": model.use_cached_vis_feats,
        "telemetry_hidden": model.telemetry_hidden,
        "head_hidden": model.head_hidden,
        "llm": llm_spec,
        "llm_name": describe(llm_spec) if llm_spec else None,
        "vision": model.vision_spec,
        "labels": {k: list(v) for k, v in L.LABELS.items()},
        "telemetry_fields": list(L.TELEMETRY_FIELDS),
        "telemetry_mean": [float(x) for x in model.tel_mean],
        "telemetry_std": [float(x) for x in model.tel_std],
        "precision": model.precision.to_dict(),
        "variant": model.variant.to_dict(),
    }


def from_metadata(
    cls: type[SimV0Model],
    meta: Mapping[str, Any],
    llm: nn.Module | None = None,
    vision_encoder: nn.Module | None = None,
    device: str | torch.device = "cpu",
    precision: Precision | str | None = None,
) -> SimV0Model:
    """An (untrained) model of the architecture `meta` describes, computing in the checkpoint's
    precision unless `precision` says otherwise.

    The frozen weights are always the ones the checkpoint was trained with (its weight dtype); an
    override changes what they are computed in, so fp32 and bf16 runs of one checkpoint differ only
    by arithmetic, and an export or benchmark can switch a model it already holds (`set_precision`).
    """
    if meta.get("labels") and {k: list(v) for k, v in meta["labels"].items()} != {
        k: list(v) for k, v in L.LABELS.items()
    }:
        raise CheckpointError(f"checkpoint label maps {meta['labels']} differ from this version's {L.LABELS}")
    trained_in = checkpoint_precision(meta, device)
    if llm is None:
        llm = build_llm(**{**dict(meta["llm"]), "dtype": dtype_name(trained_in.weights)}, device=device)
    if vision_encoder is None and not meta.get("use_cached_vis_feats", True):
        vision_encoder = vision.from_spec(meta.get("vision"), device=device)
    model = cls(
        dv=meta["dv"],
        d=meta["d"],
        F=meta["F"],
        K=meta["K"],
        use_cached_vis_feats=meta.get("use_cached_vis_feats", True),
        llm=llm,
        vision_encoder=vision_encoder,
        vision_spec=meta.get("vision"),
        telemetry_hidden=meta.get("telemetry_hidden", 256),
        head_hidden=meta.get("head_hidden", 256),
        telemetry_mean=meta.get("telemetry_mean"),
        telemetry_std=meta.get("telemetry_std"),
        precision=trained_in if precision is None else named_precision(precision),
        variant=meta.get("variant"),  # absent before the variants: v0
    )
    return model.to(device)


def rebuild(
    cls: type[SimV0Model],
    meta: Mapping[str, Any],
    state: dict[str, Any],
    llm: nn.Module | None,
    device: str | torch.device,
    precision: Precision | str | None,
) -> SimV0Model:
    """A trained model from its metadata and trainable state dict (a checkpoint's or an exported
    directory's), in eval mode. An explicit `precision` outranks the one stored with the weights."""
    model = from_metadata(cls, meta, llm=llm, device=device, precision=precision)
    if precision is not None:
        state.pop(EXTRA_STATE, None)
        log.info(
            "computing in %s (the weights were trained in %s)",
            model.precision.name,
            checkpoint_precision(meta, device).name,
        )
    model.load_state_dict(state)
    model.eval()
    return model


def saved_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint file, or the config.json of an exported directory (which adds the
    calibrated `risk_high_threshold`)."""
    return read_pretrained_config(path) if Path(path).is_dir() else dict(load_checkpoint(path)["metadata"])


def load(
    cls: type[SimV0Model],
    path: str | Path,
    device: str | torch.device = "cpu",
    llm: nn.Module | None = None,
    precision: Precision | str | None = None,
) -> SimV0Model:
    """A trained model from a checkpoint file, or from a directory `python -m sim.export` wrote
    (config.json + model.safetensors): `SimV0Model.from_checkpoint` and `from_pretrained`, which take
    either. The metadata names the LLM, the dims and the precision it was trained and validated in.

    Args:
        precision: None computes as the checkpoint did (what reproduces its val metrics);
            "fp32" or "bf16" overrides it (logged).

    Raises:
        CheckpointError: the file or directory is missing, truncated, corrupt, foreign or of another
            architecture.
    """
    if Path(path).is_dir():
        meta, state = read_pretrained(path)
    else:
        ckpt = load_checkpoint(path)
        meta, state = ckpt["metadata"], dict(ckpt["model_state_dict"])
    return rebuild(cls, meta, state, llm, device, precision)
