"""The plain-torch trainer: setup, train_epoch, evaluate, save, fit.

One step, in nanoGPT's order: autocast forward -> scaled backward -> unscale -> clip -> step ->
scaler update -> zero_grad(set_to_none=True) -> LR schedule step. The optimizer sees only the
parameters that require grad.

Under torchrun (see sim/training/distributed.py) every rank runs this same code: the trainable modules are
wrapped in DDP, each rank trains on its shard of the epoch, metrics are summed over ranks, and only
rank 0 writes. `training.grad_accum` micro-batches make one optimizer step.

Resume is exact: last.pt (written each epoch and every `checkpoint.every_n_steps` optimizer steps)
holds the model, optimizer, scaler and LR schedule, every RNG state, the position inside the epoch
and the partial epoch's metric sums. The epoch's order is a pure function of (seed, epoch), so a
resumed run skips exactly the samples it had consumed and continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sim.core import labels as L
from sim.core.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from sim.core.errors import CheckpointError, ConfigError, DataError
from sim.core.labels import DEFAULT_LOSS_WEIGHTS
from sim.core.precision import Precision
from sim.core.run import RunDir, append_jsonl, read_jsonl
from sim.data.dataset import SimData
from sim.data.validate import telemetry_stats
from sim.evaluation.loop import evaluate_batches, to_device
from sim.evaluation.metrics import EpochMetrics, compute_losses
from sim.evaluation.selection import BestEpochRule
from sim.models.build import build_model
from sim.models.model import SimV0Model
from sim.training import distributed as D
from sim.training.callbacks import Callback, StepInfo
from sim.training.debug import limit_loaders
from sim.training.guards import NonFiniteGuard, check_finite_state

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as plain lists and tensors (loads with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where this machine has as many GPUs)."""
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"].numpy(), dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds the RNG states of %d GPUs, this machine has %d: CUDA RNGs not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def resolve_device(name: str) -> torch.device:
    """`training.device` for this process (cuda:LOCAL_RANK under torchrun)."""
    return D.DistEnv.current().device(name)


class MicroStep(torch.nn.Module):
    """The forward of one training micro-batch: the model's logits, and what DDP wraps.

    A batch whose samples were all refused (`data.on_bad_sample=skip`) comes out of the loader empty,
    and it still has to be a micro-step like the others: under DDP each optimizer step's backward is one
    gradient all-reduce on every rank, and a rank that sat one out would leave the others waiting.
    The model cannot run on no samples, so the output is then a zero that depends on every trainable
    parameter: its gradients are exactly zero (the batch adds nothing to any rank's update), and its
    backward runs DDP's all-reduce like any other.
    """

    def __init__(self, model: SimV0Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | torch.Tensor:
        if batch:
            return self.model(batch)
        return sum(p.sum() for p in self.model.trainable_parameters()) * 0.0


class Trainer:
    """Trains a SimV0Model as the resolved config says and writes the run tree under `run.root`."""

    def __init__(self, cfg: DictConfig, run: RunDir, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.run = run
        self.callbacks = list(callbacks)
        self.should_stop = False  # a callback's request to end after the current epoch
        self._step_clock = time.perf_counter()  # when the last optimizer step ended (or its epoch began)
        self._step_lr = 0.0
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = D.init_from_env()
        if self.dist.enabled:
            log.info("process group: rank %d of %d, backend %s", self.dist.rank, self.dist.world_size, D.backend())
        self.seed = int(cfg.training.seed)
        seed_everything(self.seed)
        self.device = self.dist.device(cfg.training.device)
        self.use_cached = cfg.vision.get("kind", "cached") == "cached"

        self.data: SimData = instantiate(cfg.data, use_cached_vis_feats=self.use_cached, _convert_="all")
        log.info("data: train %s; val %s", self.data.train.describe(), self.data.val.describe())
        self.data.log_skipped_to(self.run.logs / "skipped_samples.txt")
        dv_data = self._check_data_shapes()

        self.model = build_model(
            cfg,
            dv_data if self.use_cached else None,
            self.device,
            features_of=self._feature_encoder() if self.use_cached else None,
        )
        self.model.set_telemetry_stats(*telemetry_stats(self.data.train.telemetry_array()))
        self.class_weights = self._class_weights()
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **OmegaConf.to_container(cfg.model.loss_weights, resolve=True)}

        self._setup_loaders()
        self.epochs = int(cfg.training.epochs)
        total_steps = self.epochs * self.steps_per_epoch
        make_optim = instantiate(cfg.optim)
        self.optimizer, self.scheduler = make_optim(self.model.trainable_parameters(), total_steps=total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.autocast == torch.float16)
        self.nonfinite = NonFiniteGuard(int(cfg.training.get("max_nonfinite_steps", 10)))
        # DDP over the trainable modules only: the frozen LLM has no gradients to reduce.
        step = MicroStep(self.model)
        self.ddp = D.wrap_ddp(step, self.device) if self.dist.world_size > 1 else None
        train_module = step if self.ddp is None else self.ddp
        self.forward = torch.compile(train_module) if cfg.training.compile else train_module
        # Evaluation bypasses DDP: there are no gradients to reduce, and ranks may hold one batch more
        # or less of the split (a collective inside the loop would then wait forever).
        self.eval_forward = (
            self.forward if self.ddp is None else (torch.compile(self.model) if cfg.training.compile else self.model)
        )
        self.train_metrics = EpochMetrics()
        self.val_metrics = EpochMetrics()
        self.best_rule = BestEpochRule.from_config(cfg.checkpoint)
        self.start_epoch = 1
        self.best_key: tuple[float, ...] = ()  # BestEpochRule.key of the best epoch (none before the first)
        self.best_epoch = 0
        self.global_step = 0
        self.every_n_steps = int(cfg.checkpoint.get("every_n_steps") or 0)
        if self.every_n_steps < 0:
            raise ConfigError(
                f"checkpoint.every_n_steps={self.every_n_steps} must be >= 0 (0 or null: only at epoch ends)"
            )
        self._progress: dict[str, Any] | None = None  # where a resumed run re-enters its epoch
        if self.dist.is_main:
            for directory in (self.run.checkpoints, self.run.metrics):
                remove_stale_temporaries(directory)  # left by a run killed mid-write
        if cfg.training.resume:
            self._resume(str(cfg.training.resume))
        else:
            self._restart_metric_files()

    @property
    def precision(self) -> Precision:
        """How the model computes (its own, so the trainer never holds a stale copy)."""
        return self.model.precision

    def _setup_loaders(self) -> None:
        """Shard the splits over the ranks and size the epoch in optimizer steps."""
        rank, world = self.dist.rank, self.dist.world_size
        n_train, n_val = len(self.data.train), len(self.data.val)
        if n_train < world:
            raise ConfigError(f"the train split has {n_train} samples, fewer than the {world} processes")
        self.grad_accum = int(self.cfg.training.get("grad_accum") or 1)
        if self.grad_accum < 1:
            raise ConfigError(f"training.grad_accum={self.grad_accum} must be >= 1")
        # The train order is a permutation seeded by (seed, epoch), dealt to the ranks; validation
        # deals every sample exactly once (no padding with duplicates).
        self.train_sampler = D.ShardSampler(n_train, rank, world, shuffle=True, seed=self.seed, even=True)
        self.train_loader = self.data.loader("train", sampler=self.train_sampler, seed=self.seed)
        self.val_loader = self.data.loader("val", sampler=D.ShardSampler(n_val, rank, world))
        self.train_loader, self.val_loader = limit_loaders(self.cfg, self.train_loader, self.val_loader)  # debug= modes
        self.steps_per_epoch = math.ceil(len(self.train_loader) / self.grad_accum)
        bs = int(self.data.batch_size)
        self.effective_batch_size = bs * self.grad_accum * world
        log.info(
            "batch size %d per process x %d accumulation step(s) x %d process(es) = %d samples per optimizer step "
            "(effective batch size); %d optimizer steps per epoch",
            bs,
            self.grad_accum,
            world,
            self.effective_batch_size,
            self.steps_per_epoch,
        )
        if n_train % world:
            log.info(
                "each epoch leaves out %d of %d train samples (a different few each epoch) so every process "
                "takes as many steps",
                n_train % world,
                n_train,
            )

    def _check_data_shapes(self) -> int:
        F = int(self.cfg.model.F)
        shapes = {}
        for split in ("train", "val"):
            shape = self.data.split(split).video_shape()
            if shape[0] != F:
                raise ConfigError(
                    f"the {split} split has F={shape[0]} frames per sample but model.F={F}; set model.F={shape[0]}"
                )
            shapes[split] = shape
        if shapes["train"][1:] != shapes["val"][1:]:
            raise ConfigError(f"train and val samples differ in shape: {shapes['train']} vs {shapes['val']}")
        shape = shapes["train"]
        if self.use_cached and len(shape) != 2:
            raise ConfigError(
                f"vision=cached reads features [F, dv] but the data yields {list(shape)} per sample; "
                "for raw frames [F, 3, H, W] pick an encoder (vision=tiny, vision=resnet18, ...)"
            )
        if not self.use_cached and (len(shape) != 4 or shape[1] != 3):
            raise ConfigError(
                f"vision={self.cfg.vision.kind} encodes raw frames [F, 3, H, W] but the data yields "
                f"{list(shape)} per sample; for cached features use vision=cached"
            )
        # dv of cached features; for raw frames the encoder gives dv and this value is unused.
        return int(shape[-1])

    def _feature_encoder(self) -> dict[str, Any] | None:
        """The encoder identity the cached splits record (`sim.commands.cache_features` writes it), or None.

        Raises:
            DataError: train and val features come from different encoders (the heads would be
                validated on features they never saw).
        """
        found = {
            split: (getattr(self.data.split(split), "meta", None) or {}).get("encoder") for split in ("train", "val")
        }
        if found["train"] and found["val"] and found["train"] != found["val"]:
            from sim.models.vision import describe

            raise DataError(
                f"the train split's features come from {describe(found['train'].get('spec', {}))} but the "
                f"val split's from {describe(found['val'].get('spec', {}))}; cache both with one encoder"
            )
        return found["train"]

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
            log.info(
                "class weights (inverse frequency): %s", {h: [round(float(x), 3) for x in v] for h, v in out.items()}
            )
            return out
        out = {}
        for head, values in OmegaConf.to_container(spec, resolve=True).items():
            if head not in L.NUM_CLASSES or len(values) != L.NUM_CLASSES[head]:
                raise ConfigError(
                    f"model.class_weights.{head}: expected {L.NUM_CLASSES.get(head, '?')} floats for head {head}"
                )
            out[head] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return out

    # ---- loop -----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch (the rest of it, when resuming inside it); its train metrics over all ranks."""
        self.model.train()
        self.train_metrics.reset()
        start, micro, elapsed_before = 0, 0, 0.0
        progress, self._progress = self._progress, None
        if progress is not None and int(progress["epoch"]) == epoch:
            start, micro, elapsed_before = int(progress["position"]), int(progress["micro"]), float(progress["elapsed"])
            if self.dist.is_main:  # the checkpoint holds the sums over all ranks: add them once
                self.train_metrics.merge(progress["train_metrics"])
        self.train_sampler.set_epoch(epoch, start)
        # Worker seeds come from the loader's generator: per epoch, so they do not depend on a resume.
        self.train_loader.generator.manual_seed(D.epoch_seed(self.seed, epoch))
        total_micro = micro + len(self.train_loader)
        first_micro, batch_size = micro, int(self.data.batch_size)
        t0 = time.perf_counter()
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}/{self.epochs} train",
            leave=False,
            disable=self._no_bar(),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for batch in bar:
            batch = to_device(batch, self.device)
            group_start = micro // self.grad_accum * self.grad_accum
            group_end = min(group_start + self.grad_accum, total_micro)
            step_now = micro + 1 == group_end
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            sync = nullcontext() if self.ddp is None or step_now else self.ddp.no_sync()
            with sync:
                out = self.forward(batch)  # under the model's own autocast (self.precision)
                # An empty batch (all its samples skipped) yields a zero, not logits: see MicroStep.
                losses = compute_losses(out, batch, self.loss_weights, self.class_weights) if batch else None
                objective = out if losses is None else losses["objective"]
                self.scaler.scale(objective / (group_end - group_start)).backward()
            # A NaN loss would void the epoch's mean; an empty batch has nothing to add to it.
            if losses is not None and self.nonfinite.observe_loss(objective):
                self.train_metrics.update(out, batch, losses)
            micro += 1
            if step_now:
                grad_norm = self._optimizer_step()
                self._step_end(epoch, losses, grad_norm, group_end - group_start, batch)
                if self.every_n_steps and self.global_step % self.every_n_steps == 0 and micro < total_micro:
                    # Counted in what the sampler dealt, not in the samples that reached the model: the
                    # loader yields one batch per sampler batch (an empty one when all were skipped),
                    # and every batch but the epoch's last is full.
                    position = start + (micro - first_micro) * batch_size * self.dist.world_size
                    self.save_progress(epoch, position, micro, elapsed_before + time.perf_counter() - t0)
            if losses is not None:
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}", refresh=False)
        elapsed = D.max_over_ranks(elapsed_before + time.perf_counter() - t0)
        metrics = self._compute(self.train_metrics, "train")
        return {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": self.train_metrics.samples / max(elapsed, 1e-9),
            **metrics,
        }

    def _optimizer_step(self) -> torch.Tensor:
        """Returns the global gradient norm before clipping, left on the device (reading it waits for the device)."""
        clip = self.cfg.training.grad_clip
        self.scaler.unscale_(self.optimizer)
        # Loggers want the norm even without clipping: an infinite bound measures it and scales by exactly 1.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), float(clip) if clip else math.inf)
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # the scheduler moves it below
        # A NaN/inf gradient skips the step (counted; too many in a row stop the run).
        if self.nonfinite.should_step(self.model.trainable_parameters(), grad_norm, self.scaler):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        return grad_norm

    def _step_end(
        self,
        epoch: int,
        losses: dict[str, torch.Tensor] | None,
        grad_norm: torch.Tensor,
        micro_batches: int,
        last_batch: dict[str, Any],
    ) -> None:
        """Tell the callbacks about the optimizer step just taken; nothing here waits for the device.

        A step whose last micro-batch lost every sample (data.on_bad_sample=skip) has no losses to report."""
        now = time.perf_counter()
        seconds, self._step_clock = now - self._step_clock, now
        if not self.callbacks or losses is None:
            return
        # Only an epoch's last micro-batch can be short, so the step's others were full.
        samples = (micro_batches - 1) * int(self.data.batch_size) + int(last_batch["weight"].shape[0])
        info = StepInfo(
            global_step=self.global_step,
            epoch=epoch,
            losses={k: v.detach() for k, v in losses.items()},
            lr=self._step_lr,
            grad_norm=grad_norm.detach(),
            samples=samples,
            seconds=seconds,
        )
        for cb in self.callbacks:
            cb.on_step_end(self, info)

    def _no_bar(self) -> bool | None:
        return None if self.cfg.training.progress_bar and self.dist.is_main else True

    def _compute(self, metrics: EpochMetrics, split: str) -> dict[str, Any]:
        """The split's metrics over all ranks. Every rank must call this (it holds collectives)."""
        if self.dist.enabled:
            state = metrics.state()
            state.pop("confusion")  # torchmetrics gathers the confusion matrices itself in compute()
            total = D.sum_over_ranks(state)
            metrics.loss_sums, metrics.weight_sum, metrics.samples = (
                dict(total["loss_sums"]),
                total["weight_sum"],
                total["samples"],
            )
        return metrics.compute(split)

    def evaluate(self, loader, split: str = "val", epoch: int | None = None) -> dict[str, Any]:
        """Metrics of the current model on a loader (no gradients, eval mode).

        Under several processes every rank must call this, each with its own share of the split
        (`self.val_loader` deals every sample to exactly one rank); the metrics are summed over ranks.
        """
        t0 = time.perf_counter()
        self._evaluate_shard(loader, split, epoch)
        elapsed = D.max_over_ranks(time.perf_counter() - t0)
        metrics = self._compute(self.val_metrics, split)
        out: dict[str, Any] = {"epoch": epoch} if epoch is not None else {}
        out.update(
            {
                "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": self.val_metrics.samples / max(elapsed, 1e-9),
                **metrics,
            }
        )
        return out

    def _evaluate_shard(self, loader, split: str, epoch: int | None) -> None:
        self.model.eval()
        evaluate_batches(
            self.eval_forward,
            loader,
            self.device,
            self.val_metrics,
            self.loss_weights,
            self.class_weights,
            desc=f"epoch {epoch} {split}" if epoch else split,
            progress_bar=False if self._no_bar() else None,
        )

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoint_payload(
        self, epoch: int, metrics: dict[str, Any], progress: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """What a checkpoint holds. Every rank must call this (it gathers the ranks' RNG states).

        Args:
            epoch: the last completed epoch.
            metrics: its val metrics.
            progress: where training stands inside the next epoch (None at an epoch's end).
        """
        check_finite_state(self.model, self.optimizer)  # never replace a good checkpoint with NaN weights
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
                "world_size": self.dist.world_size,
                "rng": D.gather_objects(rng_state()),  # one entry per rank
                "progress": progress,
            },
        }

    def save(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        """End-of-epoch checkpoints (every rank calls this; rank 0 writes)."""
        payload = self.checkpoint_payload(epoch, metrics)
        if not self.dist.is_main:
            return
        if self.cfg.checkpoint.save_every_epoch:
            save_checkpoint(self.run.checkpoints / f"epoch_{epoch:03d}.pt", payload)
        if is_best:
            save_checkpoint(self.run.best, payload)
        # last.pt is written after best.pt: a resumed run never finds a last newer than its best.
        save_checkpoint(self.run.last, payload)

    def save_progress(self, epoch: int, position: int, micro: int, elapsed: float) -> None:
        """last.pt inside an epoch, after `micro` micro-batches on each rank (every rank calls this).

        Args:
            position: samples of the epoch's order consumed by all ranks together.
            elapsed: training seconds spent in the epoch so far (for its samples_per_s).
        """
        progress = {
            "epoch": int(epoch),
            "position": int(position),
            "micro": int(micro),
            "elapsed": float(elapsed),
            "batch_size": int(self.data.batch_size),
            "grad_accum": self.grad_accum,
            # The partial epoch's sums over all ranks, so its train metrics come out as if uninterrupted.
            "train_metrics": D.sum_over_ranks(self.train_metrics.state()),
        }
        last_val = self.history["val"][-1] if self.history["val"] else {}
        payload = self.checkpoint_payload(epoch - 1, last_val, progress)
        if self.dist.is_main:
            save_checkpoint(self.run.last, payload)
            log.info(
                "checkpoint at step %d (epoch %d, %d of its samples done): %s",
                self.global_step,
                epoch,
                position,
                self.run.last,
            )

    def _resume_path(self, resume: str) -> Path:
        if resume == "auto":
            return self.run.last
        path = Path(resume)
        if path.is_dir():  # a run directory
            return path / "checkpoints" / "last.pt"
        return path

    def _resume(self, resume: str) -> None:
        """Continue from last.pt: training state, RNGs, the position in the epoch, the metric files.

        Raises:
            CheckpointError: no such checkpoint (an explicit path), or one this config cannot continue.
        """
        path = self._resume_path(resume)
        found = D.broadcast_object(path.is_file() if self.dist.is_main else None)
        if not found:
            if resume == "auto":
                log.info("training.resume=auto: no %s yet, starting fresh", path)
                self._restart_metric_files()
                return
            raise CheckpointError(f"training.resume={resume}: checkpoint not found: {path}")
        ckpt, error = D.broadcast_object(_load_or_error(path) if self.dist.is_main else None)
        if error is not None:
            raise CheckpointError(error)
        self._check_resume_config(ckpt, path)
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if self.scheduler is not None and ckpt.get("scheduler_state_dict"):
            self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        if ckpt.get("scaler_state_dict"):
            self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        state = ckpt.get("state") or {}
        done = int(ckpt["epoch"])
        self.global_step = int(state.get("global_step", 0))
        self.best_key = tuple(state.get("best_key", self.best_key))
        self.best_epoch = int(state.get("best_epoch", 0))
        self._progress = state.get("progress")
        self.start_epoch = int(self._progress["epoch"]) if self._progress else done + 1
        self._restore_rng(state)
        history = self._rewrite_metric_files(done, path) if self.dist.is_main else None
        self.history = D.broadcast_object(history)
        where = (
            f"epoch {self.start_epoch}, sample {self._progress['position']} of its order"
            if self._progress
            else f"epoch {self.start_epoch}"
        )
        log.info("resumed from %s (step %d): continuing at %s", path, self.global_step, where)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        states = state.get("rng")
        if not states:  # a checkpoint from before per-rank RNG states: the torch one only
            if state.get("torch_rng") is not None:
                torch.set_rng_state(state["torch_rng"])
            return
        if len(states) != self.dist.world_size:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: every rank takes rank 0's RNG states",
                len(states),
                self.dist.world_size,
            )
        set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])

    def _check_resume_config(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse what cannot continue (another LLM, other dims); warn where the run differs harmlessly."""
        meta, mine = ckpt["metadata"], self.model.metadata()
        for key in ("dv", "d", "F", "K", "use_cached_vis_feats", "telemetry_hidden", "head_hidden"):
            if key in meta and meta.get(key) != mine.get(key):
                raise CheckpointError(
                    f"cannot resume from {path}: {key} is {meta.get(key)!r} there, {mine.get(key)!r} in this config"
                )
        theirs = {k: v for k, v in (meta.get("llm") or {}).items() if k != "dtype"}
        ours = {k: v for k, v in (mine.get("llm") or {}).items() if k != "dtype"}
        if theirs != ours:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained on another LLM ({meta.get('llm_name') or theirs}); "
                f"this config loads {mine.get('llm_name') or ours}"
            )
        if (meta.get("llm") or {}).get("dtype") != (mine.get("llm") or {}).get("dtype"):
            log.warning(
                "resuming %s: llm.dtype was %s, now %s", path, meta["llm"].get("dtype"), mine["llm"].get("dtype")
            )
        if meta.get("vision") != mine.get("vision"):
            log.warning(
                "resuming %s with another vision encoder (%s, now %s): the heads were trained on other features",
                path,
                meta.get("vision"),
                mine.get("vision"),
            )
        old = ckpt.get("config")
        if not old:
            return
        old = OmegaConf.create(old)
        for key, consequence in RESUME_WARNINGS.items():
            then, now = _plain(OmegaConf.select(old, key)), _plain(OmegaConf.select(self.cfg, key))
            if then != now:
                log.warning("resuming %s: %s was %s, now %s; %s", path, key, then, now, consequence)
        then = (ckpt.get("state") or {}).get("world_size", 1)
        if then != self.dist.world_size:
            log.warning(
                "resuming %s: it was written by %d processes, this run has %d; the effective batch size is now %d "
                "(set training.grad_accum to keep it)",
                path,
                then,
                self.dist.world_size,
                self.effective_batch_size,
            )

    def _restart_metric_files(self) -> None:
        """A run starting from scratch owns its metric files: lines of an earlier attempt are dropped."""
        if not self.dist.is_main:
            return
        stale = sum(len(read_jsonl(self.run.metrics_file(s))) for s in ("train", "val"))
        if stale:
            log.warning(
                "%s holds %d metric lines of an earlier run that did not leave a checkpoint to resume from "
                "(or training.resume is unset); they are replaced by this run's",
                self.run.metrics,
                stale,
            )
            for split in ("train", "val"):
                atomic_write_bytes(self.run.metrics_file(split), b"")

    def _rewrite_metric_files(self, done: int, ckpt_path: Path) -> dict[str, list[dict[str, Any]]]:
        """Make the metric files hold exactly the epochs the checkpoint has completed, and return them.

        Lines of later epochs (written after the checkpoint, before the crash) are dropped; they
        will be written again. A checkpoint from another run directory brings that run's lines.
        """
        source = self.run
        other = ckpt_path.resolve().parent.parent
        if ckpt_path.parent.name == "checkpoints" and other != self.run.root.resolve() and (other / "metrics").is_dir():
            source = RunDir(other, create=False)
        history: dict[str, list[dict[str, Any]]] = {}
        for split in ("train", "val"):
            records = read_jsonl(source.metrics_file(split))
            kept = [r for r in records if int(r.get("epoch", 0)) <= done]
            if len({r.get("epoch") for r in kept}) < done:
                log.warning(
                    "%s holds %d of the %d epochs the checkpoint completed", source.metrics_file(split), len(kept), done
                )
            atomic_write_bytes(self.run.metrics_file(split), "".join(json.dumps(r) + "\n" for r in kept).encode())
            history[split] = kept
        return history

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all epochs (or until a callback sets `should_stop`); returns {"best": val metrics of the
        best epoch, "last": ..., "best_epoch", "run_dir"}."""
        rule = self.best_rule
        best = self._val_of(self.best_epoch)
        if self.best_epoch and len(self.best_key) != len(rule.key({})):
            # A checkpoint from before the floors: rank its best epoch anew (unknown: the next epoch wins).
            self.best_key = rule.key(best) if best is not None else ()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        for epoch in range(self.start_epoch, self.epochs + 1):
            if self.should_stop:  # asked after the previous epoch, or at fit start (a resumed run that had stopped)
                break
            self._step_clock = time.perf_counter()  # a step's time excludes the validation before it
            train_m = self.train_epoch(epoch)
            val_m = self.evaluate(self.val_loader, "val", epoch)
            if self.dist.is_main:
                append_jsonl(self.run.metrics_file("train"), train_m)
                append_jsonl(self.run.metrics_file("val"), val_m)
            self.history["train"].append(train_m)
            self.history["val"].append(val_m)
            is_best, key, why = rule.judge(epoch, val_m, self.best_key, self.best_epoch, best)
            if is_best:
                self.best_key, self.best_epoch, best = key, epoch, val_m
            self.save(epoch, val_m, is_best)
            log.info(
                "epoch %d/%d  train loss %.4f | val loss %.4f  risk_high_recall %s  action_accuracy %s  macro_f1 %s  "
                "| %.0f samples/s%s",
                epoch,
                self.epochs,
                train_m["loss"],
                val_m["loss"],
                _fmt(val_m["risk_high_recall"]),
                _fmt(val_m["action_accuracy"]),
                _fmt(val_m["macro_f1"]),
                train_m["samples_per_s"],
                "  (best)" if is_best else "",
            )
            log.log(logging.WARNING if is_best and rule.shortfalls(val_m) else logging.INFO, "%s", why)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, train_m, val_m, is_best)
        result = {
            "best": self._val_of(self.best_epoch),
            "last": self.history["val"][-1] if self.history["val"] else None,
            "best_epoch": self.best_epoch,
            "run_dir": str(self.run.root),
        }
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result

    def _val_of(self, epoch: int) -> dict[str, Any] | None:
        return next((m for m in self.history["val"] if m.get("epoch") == epoch), None)


# Config keys a resumed run may change, and what changing them does.
RESUME_WARNINGS = {
    "training.epochs": "the run ends at the new count (a cosine LR schedule is stretched or shrunk to it)",
    "training.seed": "the rest of the run shuffles by the new seed (inside an interrupted epoch, a sample may then "
    "be seen twice or not at all)",
    "data.batch_size": "the position inside the epoch is kept in samples; batches are now of the new size",
    "training.grad_accum": "optimizer steps now take the new number of micro-batches",
    "optim.lr": "the restored optimizer and LR schedule keep the checkpoint's value",
    "optim.weight_decay": "the restored optimizer keeps the checkpoint's value",
    "optim.schedule": "the LR schedule of this config continues from the checkpoint's step",
    "training.grad_clip": "the new value applies from here on",
    "training.amp": "the new value applies from here on",
    "model.loss_weights": "the new weights apply from here on",
    "model.class_weights": "the new weights apply from here on",
    "checkpoint.min_metrics": "later epochs are judged by the new floors against the best epoch so far as it was ranked then",
}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _load_or_error(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    # Rank 0 loads; an error travels to the other ranks instead of leaving them waiting.
    try:
        return load_checkpoint(path, map_location="cpu"), None
    except CheckpointError as exc:
        return None, str(exc)


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.4f}"
