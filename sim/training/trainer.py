"""The plain-torch trainer: builds a run from the config, then orchestrates it (setup, fit).

The step is `sim.training.step.train_step`; checkpoints, resume, the best epoch and the metric files
belong to `sim.training.checkpointing.Checkpointer`; the data side is `sim.training.inputs`.

Under torchrun (see sim/training/distributed.py) every rank runs this same code: the trainable modules are
wrapped in DDP, each rank trains on its shard of the epoch, metrics are summed over ranks, and only
rank 0 writes. `training.grad_accum` micro-batches make one optimizer step.

Resume is exact: the epoch's order is a pure function of (seed, epoch), so a resumed run skips exactly
the samples it had consumed and continues bit for bit.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from sim.core.precision import Precision
from sim.core.run import RunDir
from sim.data.validate import telemetry_stats
from sim.evaluation.loop import evaluate_batches, to_device
from sim.evaluation.metrics import EpochMetrics, compute_losses
from sim.evaluation.selection import BestEpochRule
from sim.models.build import build_model
from sim.models.model import SimV0Model, group_parameters
from sim.training import distributed as D
from sim.training.callbacks import Callback, StepInfo
from sim.training.checkpointing import Checkpointer, History, TrainingState
from sim.training.compiling import choose_compile
from sim.training.guards import NonFiniteGuard
from sim.training.inputs import class_weights, feature_encoder, loss_weights, open_data, shard_loaders
from sim.training.settings import TrainingSettings
from sim.training.step import LossFn, MicroHook, MicroStep, StepParts, StepResult, train_step

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a SimV0Model as the resolved config says and writes the run tree under `run.root`.

    Args:
        callbacks: what watches the run (see sim.training.callbacks).
        loss_fn: the training loss, with `compute_losses`' signature (default: `compute_losses`, which
            validation always uses).
        checkpointer: owns checkpoints, resume and the metric files (default: one for `run` and `cfg`).
        model_builder: builds the model, with `build_model`'s signature (default: `build_model`).
    """

    def __init__(
        self,
        cfg: DictConfig,
        run: RunDir,
        callbacks: Sequence[Callback] = (),
        *,
        loss_fn: LossFn | None = None,
        checkpointer: Checkpointer | None = None,
        model_builder: Callable[..., SimV0Model] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.callbacks = list(callbacks)
        self.loss_fn = loss_fn or compute_losses
        self.model_builder = model_builder or build_model
        self.checkpointer = checkpointer or Checkpointer(run, cfg)
        self.should_stop = False  # a callback's request to end after the current epoch
        self.start_epoch, self.global_step = 1, 0
        self._progress: dict[str, Any] | None = None  # where a resumed run re-enters its epoch
        self._step_clock = time.perf_counter()  # when the last optimizer step ended (or its epoch began)

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the run in data-flow order, then resume it or start it fresh."""
        cfg = self.cfg
        self.settings = s = TrainingSettings.from_config(cfg.training)
        self.dist = D.init_from_env()
        if self.dist.enabled:
            log.info("process group: rank %d of %d, backend %s", self.dist.rank, self.dist.world_size, D.backend())
        self.seed, self.epochs = s.seed, s.epochs
        seed_everything(self.seed)
        self.device = self.dist.device(s.device)
        cached = cfg.vision.get("kind", "cached") == "cached"
        self.data, dv = open_data(cfg, self.run, cached)
        features_of = feature_encoder(self.data) if cached else None
        self.model = self.model_builder(cfg, dv if cached else None, self.device, features_of=features_of)
        self.model.set_telemetry_stats(*telemetry_stats(self.data.train.telemetry_array()))
        self.loss_fn = training_loss(self.loss_fn, self.model)
        self.loss_weights = loss_weights(cfg.model)
        self.class_weights = class_weights(cfg.model.class_weights, self.data, self.device)
        self.loaders = shard_loaders(cfg, self.data, self.dist, self.seed, s.grad_accum)
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model, s.epochs * self.loaders.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.autocast == torch.float16)
        self.step = self._build_step()
        self.train_metrics, self.val_metrics = EpochMetrics(), EpochMetrics()
        state = TrainingState(
            self.model, self.optimizer, self.scheduler, self.scaler, int(self.data.batch_size), s.grad_accum
        )
        point = self.checkpointer.start(state, self.dist, s.resume)
        self.start_epoch, self.global_step, self._progress = point.start_epoch, point.global_step, point.progress

    def _build_step(self) -> StepParts:
        """The step's parts; `forward` runs through DDP (several processes) and torch.compile as configured."""
        steps = self.epochs * self.loaders.steps_per_epoch
        self.compile_choice = choose_compile(self.cfg, self.settings, self.device, self.model.llm, steps)
        compiled = self.compile_choice.enabled
        # DDP over the trainable modules only: the frozen LLM has no gradients to reduce.
        micro = MicroStep(self.model)
        ddp = D.wrap_ddp(micro, self.device) if self.dist.world_size > 1 else None
        module = micro if ddp is None else ddp
        self.forward = torch.compile(module) if compiled else module
        # Evaluation bypasses DDP: there are no gradients to reduce, and ranks may hold one batch more
        # or less of the split (a collective inside the loop would then wait forever).
        self.eval_forward = self.forward if ddp is None else (torch.compile(self.model) if compiled else self.model)
        guard = NonFiniteGuard(self.settings.max_nonfinite_steps)
        return StepParts(
            self.model,
            self.forward,
            self.loss_fn,
            self.loss_weights,
            self.class_weights,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.settings.clip_bound,
            guard,
            ddp,
        )

    @property
    def precision(self) -> Precision:
        """How the model computes (its own, so the trainer never holds a stale copy)."""
        return self.model.precision

    @property
    def history(self) -> History:
        """The train and val metrics of every epoch so far, as in the metric files."""
        return self.checkpointer.history

    @property
    def best_epoch(self) -> int:
        return self.checkpointer.best_epoch

    # ---- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all epochs (or until a callback sets `should_stop`); returns {"best": val metrics of the
        best epoch, "last": ..., "best_epoch", "run_dir"}."""
        for cb in self.callbacks:
            cb.on_fit_start(self)
        for epoch in range(self.start_epoch, self.epochs + 1):
            if self.should_stop:  # asked after the previous epoch, or at fit start (a resumed run that had stopped)
                break
            self._step_clock = time.perf_counter()  # a step's time excludes the validation before it
            train_m = self.train_epoch(epoch)
            val_m = self.evaluate(self.loaders.val, "val", epoch)
            is_best, why = self.checkpointer.end_epoch(epoch, train_m, val_m, self.global_step)
            _log_epoch(epoch, self.epochs, train_m, val_m, is_best, why, self.checkpointer.rule)
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, train_m, val_m, is_best)
        result = {
            "best": self.checkpointer.best,
            "last": self.history["val"][-1] if self.history["val"] else None,
            "best_epoch": self.best_epoch,
            "run_dir": str(self.run.root),
        }
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch (the rest of it, when resuming inside it); its train metrics over all ranks."""
        self.model.train()
        self.train_metrics.reset()
        start, micro, elapsed_before = self._reenter(epoch)
        loader, accum = self.loaders.train, self.settings.grad_accum
        self.loaders.train_sampler.set_epoch(epoch, start)
        # Worker seeds come from the loader's generator: per epoch, so they do not depend on a resume.
        loader.generator.manual_seed(D.epoch_seed(self.seed, epoch))
        total_micro, first_micro, t0 = micro + len(loader), micro, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{self.epochs} train",
            leave=False,
            disable=self._no_bar(),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        batches, on_micro = (to_device(batch, self.device) for batch in bar), self._count_micro(bar)
        while micro < total_micro:
            group_start = micro // accum * accum
            group_end = min(group_start + accum, total_micro)
            result = train_step(self.step, batches, group_end - micro, group_end - group_start, on_micro)
            micro = group_end
            self.global_step += 1
            self._step_end(epoch, result, group_end - group_start)
            if self.checkpointer.progress_due(self.global_step) and micro < total_micro:
                # Counted in what the sampler dealt, not in the samples that reached the model: the
                # loader yields one batch per sampler batch (an empty one when all were skipped),
                # and every batch but the epoch's last is full.
                position = start + (micro - first_micro) * int(self.data.batch_size) * self.dist.world_size
                elapsed = elapsed_before + time.perf_counter() - t0
                self.checkpointer.save_progress(epoch, position, micro, elapsed, self.train_metrics, self.global_step)
        bar.close()
        elapsed = D.max_over_ranks(elapsed_before + time.perf_counter() - t0)
        metrics = over_ranks(self.train_metrics, "train", self.dist)
        return {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": self.train_metrics.samples / max(elapsed, 1e-9),
            **metrics,
            **model_figures(self.model),
        }

    def _reenter(self, epoch: int) -> tuple[int, int, float]:
        """Where the epoch starts (sample position, micro-batch, seconds spent): 0s unless resuming inside it."""
        progress, self._progress = self._progress, None
        if progress is None or int(progress["epoch"]) != epoch:
            return 0, 0, 0.0
        if self.dist.is_main:  # the checkpoint holds the sums over all ranks: add them once
            self.train_metrics.merge(progress["train_metrics"])
        return int(progress["position"]), int(progress["micro"]), float(progress["elapsed"])

    def _count_micro(self, bar: tqdm) -> MicroHook:
        """What each micro-batch adds to the epoch: its metrics (unless its loss was NaN) and the bar's loss."""

        def on_micro(out: Any, batch: dict[str, Any], losses: dict[str, torch.Tensor] | None, finite: bool) -> None:
            if losses is None:  # an empty batch
                return
            if finite:
                self.train_metrics.update(out, batch, losses)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", refresh=False)

        return on_micro

    def _step_end(self, epoch: int, result: StepResult, micro_batches: int) -> None:
        """Tell the callbacks about the optimizer step just taken; nothing here waits for the device.

        A step whose last micro-batch lost every sample (data.on_bad_sample=skip) has no losses to report."""
        now = time.perf_counter()
        seconds, self._step_clock = now - self._step_clock, now
        if not self.callbacks or result.losses is None:
            return
        # Only an epoch's last micro-batch can be short, so the step's others were full.
        samples = (micro_batches - 1) * int(self.data.batch_size) + int(result.last_batch["weight"].shape[0])
        info = StepInfo(
            global_step=self.global_step,
            epoch=epoch,
            losses={k: v.detach() for k, v in result.losses.items()},
            lr=result.lr,
            grad_norm=result.grad_norm.detach(),
            samples=samples,
            seconds=seconds,
        )
        for cb in self.callbacks:
            cb.on_step_end(self, info)

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, loader: Any, split: str = "val", epoch: int | None = None) -> dict[str, Any]:
        """Metrics of the current model on a loader (no gradients, eval mode).

        Under several processes every rank must call this, each with its own share of the split
        (`self.loaders.val` deals every sample to exactly one rank); the metrics are summed over ranks.
        """
        t0 = time.perf_counter()
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
        elapsed = D.max_over_ranks(time.perf_counter() - t0)
        metrics = over_ranks(self.val_metrics, split, self.dist)
        out: dict[str, Any] = {"epoch": epoch} if epoch is not None else {}
        out.update(
            {
                "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": self.val_metrics.samples / max(elapsed, 1e-9),
                **metrics,
            }
        )
        return out

    def _no_bar(self) -> bool | None:
        return None if self.settings.progress_bar and self.dist.is_main else True


def build_optimizer(optim: DictConfig, model: SimV0Model, total_steps: int) -> tuple[Any, Any]:
    """The `optim` group's (optimizer, LR scheduler or None) over the model's trainable parameters,
    grouped by part of the model for `optim.lr_groups`."""
    make_optim = instantiate(optim)
    return make_optim(model.trainable_parameters(), total_steps, groups=group_parameters(model))


def training_loss(loss_fn: LossFn, model: SimV0Model) -> LossFn:
    """The loss the step minimizes: `compute_losses` with the model's learned loss weights where it has
    them (model.loss_weighting=learned); a loss function passed in is used as it is."""
    if model.loss_weighting is None or loss_fn is not compute_losses:
        return loss_fn
    return functools.partial(compute_losses, learned=model.loss_weighting.combine)


def model_figures(model: SimV0Model) -> dict[str, float]:
    """What the train metrics record of the model itself: its trainable parameters and, with
    model.loss_weighting=learned, each head's weight exp(-s_h) now."""
    learned = model.loss_weighting
    weights = {} if learned is None else {f"loss_weight_{h}": w for h, w in learned.weights().items()}
    return {"trainable_params": sum(p.numel() for p in model.trainable_parameters()), **weights}


def over_ranks(metrics: EpochMetrics, split: str, dist: D.DistEnv) -> dict[str, Any]:
    """The split's metrics over all ranks. Every rank must call this (it holds collectives)."""
    if dist.enabled:
        state = metrics.state()
        state.pop("confusion")  # torchmetrics gathers the confusion matrices itself in compute()
        total = D.sum_over_ranks(state)
        metrics.loss_sums, metrics.weight_sum, metrics.samples = (
            dict(total["loss_sums"]),
            total["weight_sum"],
            total["samples"],
        )
    return metrics.compute(split)


def _log_epoch(
    epoch: int, epochs: int, train: dict[str, Any], val: dict[str, Any], is_best: bool, why: str, rule: BestEpochRule
) -> None:
    log.info(
        "epoch %d/%d  train loss %.4f | val loss %.4f  risk_high_recall %s  action_accuracy %s  macro_f1 %s  "
        "| %.0f samples/s%s",
        epoch,
        epochs,
        train["loss"],
        val["loss"],
        _fmt(val["risk_high_recall"]),
        _fmt(val["action_accuracy"]),
        _fmt(val["macro_f1"]),
        train["samples_per_s"],
        "  (best)" if is_best else "",
    )
    log.log(logging.WARNING if is_best and rule.shortfalls(val) else logging.INFO, "%s", why)


def _fmt(v: float | None) -> str:
    return "null" if v is None else f"{v:.4f}"
