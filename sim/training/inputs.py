"""The data side of a run: the splits checked against the model config, the loaders sharded over the
ranks, and the loss weights (class weights can depend on the train split's label counts)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sim.core import labels as L
from sim.core.errors import ConfigError, DataError
from sim.core.labels import DEFAULT_LOSS_WEIGHTS
from sim.core.run import RunDir
from sim.data.dataset import SimData
from sim.models.vision import describe
from sim.training import distributed as D
from sim.training.debug import limit_loaders

log = logging.getLogger(__name__)


def open_data(cfg: DictConfig, run: RunDir, use_cached: bool) -> tuple[SimData, int]:
    """The `data` node instantiated, its refused samples logged to the run; with the per-frame width dv.

    Raises:
        ConfigError: the splits do not fit model.F or the vision kind.
    """
    data: SimData = instantiate(cfg.data, use_cached_vis_feats=use_cached, _convert_="all")
    log.info("data: train %s; val %s", data.train.describe(), data.val.describe())
    data.log_skipped_to(run.logs / "skipped_samples.txt")
    return data, _check_shapes(cfg, data, use_cached)


def _check_shapes(cfg: DictConfig, data: SimData, use_cached: bool) -> int:
    F = int(cfg.model.F)
    shapes = {}
    for split in ("train", "val"):
        shape = data.split(split).video_shape()
        if shape[0] != F:
            raise ConfigError(
                f"the {split} split has F={shape[0]} frames per sample but model.F={F}; set model.F={shape[0]}"
            )
        shapes[split] = shape
    if shapes["train"][1:] != shapes["val"][1:]:
        raise ConfigError(f"train and val samples differ in shape: {shapes['train']} vs {shapes['val']}")
    shape = shapes["train"]
    if use_cached and len(shape) != 2:
        raise ConfigError(
            f"vision=cached reads features [F, dv] but the data yields {list(shape)} per sample; "
            "for raw frames [F, 3, H, W] pick an encoder (vision=tiny, vision=resnet18, ...)"
        )
    if not use_cached and (len(shape) != 4 or shape[1] != 3):
        raise ConfigError(
            f"vision={cfg.vision.kind} encodes raw frames [F, 3, H, W] but the data yields "
            f"{list(shape)} per sample; for cached features use vision=cached"
        )
    # dv of cached features; for raw frames the encoder gives dv and this value is unused.
    return int(shape[-1])


def feature_encoder(data: SimData) -> dict[str, Any] | None:
    """The encoder identity the cached splits record (`sim.commands.cache_features` writes it), or None.

    Raises:
        DataError: train and val features come from different encoders (the heads would be
            validated on features they never saw).
    """
    found = {split: (getattr(data.split(split), "meta", None) or {}).get("encoder") for split in ("train", "val")}
    if found["train"] and found["val"] and found["train"] != found["val"]:
        raise DataError(
            f"the train split's features come from {describe(found['train'].get('spec', {}))} but the "
            f"val split's from {describe(found['val'].get('spec', {}))}; cache both with one encoder"
        )
    return found["train"]


def loss_weights(model: DictConfig) -> dict[str, float]:
    """`model.loss_weights` over the defaults."""
    given = cast(dict[str, float], OmegaConf.to_container(model.loss_weights, resolve=True))  # validate_config checked
    return {**DEFAULT_LOSS_WEIGHTS, **given}


def class_weights(spec: Any, data: SimData, device: torch.device) -> dict[str, torch.Tensor] | None:
    """`model.class_weights`: null, auto (inverse frequency on the train split) or explicit lists per head.

    Raises:
        ConfigError: a head's list does not have one float per class.
    """
    if spec is None:
        return None
    out = {}
    if spec == "auto":
        for head, arr in data.train.label_arrays().items():
            n = L.NUM_CLASSES[head]
            counts = np.bincount(arr, minlength=n).astype(np.float64)
            w = np.where(counts > 0, counts.sum() / (n * np.maximum(counts, 1)), 1.0)
            out[head] = torch.tensor(w, dtype=torch.float32, device=device)
        log.info("class weights (inverse frequency): %s", {h: [round(float(x), 3) for x in v] for h, v in out.items()})
        return out
    given = cast(dict[str, list[float]], OmegaConf.to_container(spec, resolve=True))  # validate_config checked
    for head, values in given.items():
        if head not in L.NUM_CLASSES or len(values) != L.NUM_CLASSES[head]:
            raise ConfigError(
                f"model.class_weights.{head}: expected {L.NUM_CLASSES.get(head, '?')} floats for head {head}"
            )
        out[head] = torch.tensor(values, dtype=torch.float32, device=device)
    return out


@dataclass
class Loaders:
    train_sampler: D.ShardSampler
    train: Any  # a DataLoader, or a debug mode's limited view of one
    val: Any
    steps_per_epoch: int  # optimizer steps
    effective_batch_size: int  # samples per optimizer step over all ranks


def shard_loaders(cfg: DictConfig, data: SimData, dist: D.DistEnv, seed: int, grad_accum: int) -> Loaders:
    """Shard the splits over the ranks and size the epoch in optimizer steps.

    Raises:
        ConfigError: fewer train samples than processes, or a bad debug limit.
    """
    rank, world = dist.rank, dist.world_size
    n_train, n_val = len(data.train), len(data.val)
    if n_train < world:
        raise ConfigError(f"the train split has {n_train} samples, fewer than the {world} processes")
    # The train order is a permutation seeded by (seed, epoch), dealt to the ranks; validation
    # deals every sample exactly once (no padding with duplicates).
    sampler = D.ShardSampler(n_train, rank, world, shuffle=True, seed=seed, even=True)
    train = data.loader("train", sampler=sampler, seed=seed)
    val = data.loader("val", sampler=D.ShardSampler(n_val, rank, world))
    train, val = limit_loaders(cfg, train, val)  # debug= modes
    loaders = Loaders(
        sampler, train, val, math.ceil(len(train) / grad_accum), int(data.batch_size) * grad_accum * world
    )
    log.info(
        "batch size %d per process x %d accumulation step(s) x %d process(es) = %d samples per optimizer step "
        "(effective batch size); %d optimizer steps per epoch",
        int(data.batch_size),
        grad_accum,
        world,
        loaders.effective_batch_size,
        loaders.steps_per_epoch,
    )
    if n_train % world:
        log.info(
            "each epoch leaves out %d of %d train samples (a different few each epoch) so every process "
            "takes as many steps",
            n_train % world,
            n_train,
        )
    return loaders
