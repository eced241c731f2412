"""The plain-torch trainer: setup, train_epoch, evaluate, save, fit.

One step, in nanoGPT's order: autocast forward -> scaled backward -> unscale -> clip -> step ->
scaler update -> zero_grad(set_to_none=True) -> LR schedule step. The optimizer sees only the
parameters that require grad.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sim import labels as L
from sim.checkpoint import load_checkpoint, save_checkpoint
from sim.dataset import SimData
from sim.errors import CheckpointError, ConfigError
from sim.metrics import DEFAULT_LOSS_WEIGHTS, EpochMetrics, compute_losses
from sim.model import SimV0Model
from sim.precision import dtype_name, fast_bf16, resolve_dtype
from sim.run import RunDir, append_jsonl, read_jsonl

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device={name}: CUDA is not available on this machine")
    return device


def monitor_mode(monitor: str, mode: str) -> str:
    if mode == "auto":
        return "min" if monitor.startswith("loss") else "max"
    if mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={mode!r}: expected auto, min or max")
    return mode


def rank_key(metrics: dict[str, Any], monitor: str, tie_breaker: str | None, mode: str) -> tuple[float, float]:
    """Sortable key (higher is better) of an epoch's val metrics; undefined values rank last."""
    sign = 1.0 if mode == "max" else -1.0

    def val(name: str | None, s: float) -> float:
        v = metrics.get(name) if name else None
        return -math.inf if v is None else s * float(v)

    return val(monitor, sign), val(tie_breaker, 1.0 if not (tie_breaker or "").startswith("loss") else -1.0)


class Trainer:
    """Trains a SimV0Model as the resolved config says and writes the run tree under `run.root`."""

    def __init__(self, cfg: DictConfig, run: RunDir) -> None:
        self.cfg = cfg
        self.run = run
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(int(cfg.training.seed))
        self.device = resolve_device(cfg.training.device)
        self._setup_precision()
        self.use_cached = cfg.vision.get("kind", "cached") == "cached"

        self.data: SimData = instantiate(cfg.data, use_cached_vis_feats=self.use_cached, _convert_="all")
        log.info("data: train %s; val %s", self.data.train.describe(), self.data.val.describe())
        dv_data = self._check_data_shapes()

        llm = instantiate(cfg.llm, device=self.device, _convert_="all")
        encoder = instantiate(cfg.vision, _convert_="all")
        if encoder is not None:
            encoder = encoder.to(self.device)
        vision_spec = OmegaConf.to_container(cfg.vision, resolve=True)
        vision_spec.pop("_target_", None)
        model_dv = cfg.model.dv
        if encoder is None:
            if model_dv is not None and int(model_dv) != dv_data:
                raise ConfigError(f"model.dv={model_dv} but the data's features are {dv_data} wide; leave model.dv unset")
            model_dv = dv_data
        self.model = SimV0Model(
            dv=model_dv,
            d=cfg.model.d,
            F=int(cfg.model.F),
            K=int(cfg.model.K),
            use_cached_vis_feats=self.use_cached,
            llm=llm,
            vision_encoder=encoder,
            vision_spec=vision_spec,
            telemetry_hidden=int(cfg.model.telemetry_hidden),
            head_hidden=int(cfg.model.head_hidden),
        ).to(self.device)
        tel = self.data.train.telemetry_array()
        self.model.set_telemetry_stats(torch.from_numpy(tel.mean(0)).float(), torch.from_numpy(tel.std(0)).float())
        self.class_weights = self._class_weights()
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **OmegaConf.to_container(cfg.model.loss_weights, resolve=True)}

        self.train_loader = self.data.loader("train", shuffle=True, seed=int(cfg.training.seed))
        self.val_loader = self.data.loader("val", shuffle=False)
        self.epochs = int(cfg.training.epochs)
        total_steps = self.epochs * len(self.train_loader)
        make_optim = instantiate(cfg.optim)
        self.optimizer, self.scheduler = make_optim(self.model.trainable_parameters(), total_steps=total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward = torch.compile(self.model) if cfg.training.compile else self.model
        self.train_metrics = EpochMetrics()
        self.val_metrics = EpochMetrics()
        self.monitor = str(cfg.checkpoint.monitor)
        self.mode = monitor_mode(self.monitor, str(cfg.checkpoint.mode))
        self.tie_breaker = cfg.checkpoint.get("tie_breaker")
        self.start_epoch = 1
        self.best_key: tuple[float, float] = (-math.inf, -math.inf)
        self.best_epoch = 0
        self.global_step = 0
        if cfg.training.resume:
            self._resume(str(cfg.training.resume))

    def _setup_precision(self) -> None:
        amp = self.cfg.training.amp
        dtype = resolve_dtype(self.cfg.training.amp_dtype, self.device)
        if amp == "auto":
            enabled = fast_bf16(self.device)
            dtype = torch.bfloat16
        elif isinstance(amp, bool):
            enabled = amp
        else:
            raise ConfigError(f"training.amp={amp!r}: expected auto, true or false")
        if enabled and dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError("training.amp_dtype=float16 needs CUDA; on CPU use bfloat16")
        if enabled and dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"training.amp_dtype={self.cfg.training.amp_dtype}: expected bfloat16 or float16")
        self.amp_dtype = dtype if enabled else None
        log.info("device %s, autocast %s", self.device, dtype_name(dtype) if enabled else "off")

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_data_shapes(self) -> int:
        F = int(self.cfg.model.F)
        shapes = {}
        for split in ("train", "val"):
            shape = self.data.split(split).video_shape()
            if shape[0] != F:
                raise ConfigError(f"the {split} split has F={shape[0]} frames per sample but model.F={F}; set model.F={shape[0]}")
            shapes[split] = shape
        if shapes["train"][1:] != shapes["val"][1:]:
            raise ConfigError(f"train and val samples differ in shape: {shapes['train']} vs {shapes['val']}")
        shape = shapes["train"]
        if self.use_cached and len(shape) != 2:
            raise ConfigError(f"vision=cached reads features [F, dv] but the data yields {list(shape)} per sample; "
                              "for raw frames [F, 3, H, W] pick an encoder (vision=tiny, vision=resnet18, ...)")
        if not self.use_cached and (len(shape) != 4 or shape[1] != 3):
            raise ConfigError(f"vision={self.cfg.vision.kind} encodes raw frames [F, 3, H, W] but the data yields "
                              f"{list(shape)} per sample; for cached features use vision=cached")
        # dv of cached features; for raw frames the encoder gives dv and this value is unused.
        return int(shape[-1])

    def _class_weights(self) -> dict[str, torch.Tensor] | None:
        spec = self.cfg.model.class_weights
        if spec is None:
            return None
        if spec == "auto":
            arrays = self.data.train.label_arrays()
            out = {}
            for head, arr in arrays.items():
                n = L.NUM_CLASSES[head]
                counts = np.bincount(arr, minlength=n).astype(np.float64)
                w = np.where(counts > 0, counts.sum() / (n * np.maximum(counts, 1)), 1.0)
                out[head] = torch.tensor(w, dtype=torch.float32, device=self.device)
            log.info("class weights (inverse frequency): %s", {h: [round(float(x), 3) for x in v] for h, v in out.items()})
            return out
        out = {}
        for head, values in OmegaConf.to_container(spec, resolve=True).items():
            if head not in L.NUM_CLASSES or len(values) != L.NUM_CLASSES[head]:
                raise ConfigError(f"model.class_weights.{head}: expected {L.NUM_CLASSES.get(head, '?')} floats for head {head}")
            out[head] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return out

    # ---- loop -----------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        nb = self.device.type == "cuda"
        return {k: (v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.model.train()
        self.train_metrics.reset()
        clip = self.cfg.training.grad_clip
        t0 = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs} train", leave=False,
                   disable=None if self.cfg.training.progress_bar else True, file=sys.stderr, dynamic_ncols=True)
        for batch in bar:
            batch = self._to_device(batch)
            with self.autocast():
                logits = self.forward(batch)
            losses = compute_losses(logits, batch, self.loss_weights, self.class_weights)
            self.scaler.scale(losses["objective"]).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), float(clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
            self.train_metrics.update(logits, batch, losses)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", refresh=False)
        elapsed = time.perf_counter() - t0
        metrics = self.train_metrics.compute("train")
        return {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": self.train_metrics.samples / max(elapsed, 1e-9), **metrics}

    @torch.inference_mode()
    def evaluate(self, loader, split: str = "val", epoch: int | None = None) -> dict[str, Any]:
        """Metrics of the current model on a loader (no gradients, eval mode)."""
        self.model.eval()
        self.val_metrics.reset()
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch} {split}" if epoch else split, leave=False,
                   disable=None if self.cfg.training.progress_bar else True, file=sys.stderr, dynamic_ncols=True)
        for batch in bar:
            batch = self._to_device(batch)
            with self.autocast():
                logits = self.forward(batch)
            losses = compute_losses(logits, batch, self.loss_weights, self.class_weights)
            self.val_metrics.update(logits, batch, losses)
        elapsed = time.perf_counter() - t0
        metrics = self.val_metrics.compute(split)
        out: dict[str, Any] = {"epoch": epoch} if epoch is not None else {}
        out.update({"lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": self.val_metrics.samples / max(elapsed, 1e-9), **metrics})
        return out

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoint_payload(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model_state_dict": self.model.trainable_state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "epoch": int(epoch),
            "metrics": metrics,
            "metadata": self.model.metadata(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "state": {
                "global_step": self.global_step,
                "best_key": list(self.best_key),
                "best_epoch": self.best_epoch,
                "torch_rng": torch.get_rng_state(),
            },
        }

    def save(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        payload = self.checkpoint_payload(epoch, metrics)
        if self.cfg.checkpoint.save_every_epoch:
            save_checkpoint(self.run.checkpoints / f"epoch_{epoch:03d}.pt", payload)
        if is_best:
            save_checkpoint(self.run.best, payload)
        # last.pt is written after best.pt: a resumed run never finds a last newer than its best.
        save_checkpoint(self.run.last, payload)

    def _resume(self, resume: str) -> None:
        path = self.run.last if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            log.info("training.resume=auto: no %s yet, starting fresh", path)
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        meta, mine = ckpt["metadata"], self.model.metadata()
        for key in ("dv", "d", "F", "K", "llm"):
            if meta.get(key) != mine.get(key):
                raise CheckpointError(f"cannot resume from {path}: {key} is {meta.get(key)!r} there, {mine.get(key)!r} in this config")
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if self.scheduler is not None and ckpt.get("scheduler_state_dict"):
            self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        if ckpt.get("scaler_state_dict"):
            self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        state = ckpt.get("state", {})
        self.global_step = int(state.get("global_step", 0))
        self.best_key = tuple(state.get("best_key", self.best_key))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.start_epoch = int(ckpt["epoch"]) + 1
        # Keep the metric files consistent with the checkpoint: drop lines of epochs it does not hold.
        for split in ("train", "val"):
            f = self.run.metrics_file(split)
            kept = [r for r in read_jsonl(f) if int(r.get("epoch", 0)) <= int(ckpt["epoch"])]
            f.write_text("".join(__import__("json").dumps(r) + "\n" for r in kept))
            self.history[split] = kept
        log.info("resumed from %s at epoch %d", path, ckpt["epoch"])

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all epochs; returns {"best": val metrics of the best epoch, "last": ..., "best_epoch"}."""
        for epoch in range(self.start_epoch, self.epochs + 1):
            train_m = self.train_epoch(epoch)
            val_m = self.evaluate(self.val_loader, "val", epoch)
            append_jsonl(self.run.metrics_file("train"), train_m)
            append_jsonl(self.run.metrics_file("val"), val_m)
            self.history["train"].append(train_m)
            self.history["val"].append(val_m)
            key = rank_key(val_m, self.monitor, self.tie_breaker, self.mode)
            is_best = key > self.best_key or self.best_epoch == 0
            if is_best:
                self.best_key, self.best_epoch = key, epoch
            self.save(epoch, val_m, is_best)
            log.info(
                "epoch %d/%d  train loss %.4f | val loss %.4f  risk_high_recall %s  action_accuracy %s  macro_f1 %s  "
                "| %.0f samples/s%s",
                epoch, self.epochs, train_m["loss"], val_m["loss"], _fmt(val_m["risk_high_recall"]),
                _fmt(val_m["action_accuracy"]), _fmt(val_m["macro_f1"]), train_m["samples_per_s"],
                "  (best)" if is_best else "",
            )
        best = next((m for m in self.history["val"] if m.get("epoch") == self.best_epoch), None)
        return {"best": best, "last": self.history["val"][-1] if self.history["val"] else None,
                "best_epoch": self.best_epoch, "run_dir": str(self.run.root)}


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.4f}"
