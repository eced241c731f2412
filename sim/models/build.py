"""`build_model(cfg)`: the one place a model is assembled from a composed config.

A checkpoint is rebuilt by `SimV0Model.from_checkpoint` (from its metadata alone); both paths end in
the same `SimV0Model` constructor and the same `Precision`, so training, evaluation, export and the
inference wrapper compute alike.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sim.core.config import to_dict
from sim.core.errors import ConfigError
from sim.core.precision import Precision, dtype_name, resolve_precision
from sim.models.model import SimV0Model
from sim.models.variants import ModelVariant

log = logging.getLogger(__name__)


def config_precision(cfg: DictConfig, device: torch.device) -> Precision:
    """The run's precision from `llm.dtype`, `training.amp` and `training.amp_dtype` (see
    `sim.core.precision.resolve_precision`: `auto` is bf16 where `device` computes it natively)."""
    training = cfg.get("training") or {}
    return resolve_precision(
        cfg.llm.get("dtype", "auto"), training.get("amp", "auto"), training.get("amp_dtype", "bfloat16"), device
    )


def build_model(
    cfg: DictConfig, data_dv: int | None, device: torch.device, features_of: dict | None = None
) -> SimV0Model:
    """The model `cfg` describes: its frozen LLM (and vision encoder, for raw frames), built on
    `device` in the run's precision.

    Args:
        data_dv: the width of the data's cached features (None for raw frames: the encoder gives dv).
        features_of: the identity of the encoder that cached the features (the split's meta.json
            `encoder`), recorded in the checkpoint so that frames can later go through that same
            encoder (`python -m sim.stream`).

    Raises:
        ConfigError: a typed `model.dv` or `model.d` that disagrees with the data, encoder or LLM.
        LLMLoadError: the LLM or encoder cannot be loaded (the message says how to run offline).
    """
    precision = config_precision(cfg, device)
    llm = instantiate(cfg.llm, device=device, dtype=dtype_name(precision.weights), _convert_="all")
    encoder = instantiate(cfg.vision, _convert_="all")
    model_dv = cfg.model.dv
    if encoder is None:
        if model_dv is not None and data_dv is not None and int(model_dv) != data_dv:
            raise ConfigError(f"model.dv={model_dv} but the data's features are {data_dv} wide; leave model.dv unset")
        model_dv = data_dv if data_dv is not None else model_dv
        vision_spec = to_dict(cfg.vision)
        vision_spec.pop("_target_", None)
        if features_of is not None:
            vision_spec["features_of"] = features_of
    else:
        encoder = encoder.to(device)
        vision_spec = dict(encoder.sim_spec)
    model = SimV0Model(
        dv=model_dv,
        d=cfg.model.d,
        F=int(cfg.model.F),
        K=int(cfg.model.K),
        use_cached_vis_feats=encoder is None,
        llm=llm,
        vision_encoder=encoder,
        vision_spec=vision_spec,
        telemetry_hidden=int(cfg.model.telemetry_hidden),
        head_hidden=int(cfg.model.head_hidden),
        precision=precision,
        variant=ModelVariant.from_options(to_dict(cfg.model)),
        loss_weights=to_dict(cfg.model.loss_weights) if cfg.model.get("loss_weights") else None,
    ).to(device)
    if not model.variant.is_v0():
        log.info("model variant: %s", model.variant.describe())
    if (cfg.get("training") or {}).get("gradient_checkpointing", False):
        model.set_gradient_checkpointing()
    log.info(
        "device %s, precision %s (frozen weights %s, autocast %s)",
        device,
        precision.name,
        dtype_name(precision.weights),
        "off" if precision.autocast is None else dtype_name(precision.autocast),
    )
    return model
