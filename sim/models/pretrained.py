"""The portable form of a trained model: a directory with `config.json` and `model.safetensors`.

`config.json` holds everything `SimV0Model.from_checkpoint` reads from a checkpoint's metadata (dims, F,
K, the LLM and encoder identity, precision, labels, telemetry statistics) plus the calibrated
`risk_high_threshold`; `model.safetensors` holds the trainable weights, the telemetry statistics and the
precision code, as a checkpoint's `model_state_dict` does. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sim.core.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PRETRAINED_FORMAT = "sim-v0-pretrained"


def is_pretrained_dir(path: str | Path) -> bool:
    """True for a directory `save_pretrained` wrote (what `from_pretrained` loads)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def save_pretrained(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], out: str | Path, **extra: Any
) -> Path:
    """Write `state` (a trainable state dict) and `metadata` (plus `extra` keys) into directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": PRETRAINED_FORMAT})
    config = {**dict(metadata), **extra, "artifact_format": PRETRAINED_FORMAT}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_pretrained_config(path: str | Path) -> dict[str, Any]:
    """The `config.json` of a directory `save_pretrained` wrote, checked to be one.

    Raises:
        CheckpointError: not such a directory, or its config is unreadable or foreign.
    """
    p = Path(path)
    if not is_pretrained_dir(p):
        raise CheckpointError(
            f"{p} is not an exported SIM model: expected a directory holding {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(write one with `python -m sim.export checkpoint=... out=DIR`)"
        )
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {p / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict) or config.get("artifact_format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{p / CONFIG_FILE} is not a SIM model config (artifact_format != {PRETRAINED_FORMAT!r})")
    return config


def read_pretrained(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a directory `save_pretrained` wrote.

    Raises:
        CheckpointError: not such a directory, or a file in it is unreadable or damaged.
    """
    config = read_pretrained_config(path)
    weights = Path(path) / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    return config, state
