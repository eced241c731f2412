"""The `debug=` modes (conf/debug/): what a user runs first on new data, and when a run misbehaves.

- `fdr`: one train batch and one val batch, one epoch; the pipeline end to end in seconds.
- `overfit`: the same few train batches every epoch; the train loss must fall near zero, and the run
  says so when it does not (a model that cannot memorize a batch has a bug, not a data problem).
- `limit`: a fraction or a count of the batches per epoch, train and val.
- `profiler`: a torch.profiler trace of a few steps in `<run_dir>/tensorboard/profiler/`.
- `anomaly`: autograd anomaly detection, a NaN/inf check on the output of every module, forward
  and evaluation alike, and on the weights after every step; the first non-finite value stops the run
  naming where it appeared.

Every mode extends `conf/debug/default.yaml`, which holds every `debug.*` key, so modes combine
(`debug=fdr debug.anomaly=true`). The trainer limits its loaders through `limit_loaders`; everything
else is a callback (`build_debug_callbacks`), so the loop has no debug branches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from sim.core.errors import ConfigError
from sim.training.callbacks import Callback, StepInfo
from sim.training.guards import NonFiniteError

if TYPE_CHECKING:
    from sim.training.trainer import Trainer

log = logging.getLogger(__name__)


def _option(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, f"debug.{key}", default=default)


def _batches(limit: Any, available: int, key: str) -> int | None:
    """A `limit_*_batches` value as a batch count (None: no limit).

    Raises:
        ConfigError: not null, an integer >= 1 or a fraction in (0, 1].
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ConfigError(
            f"debug.{key}={limit!r}: expected a count of batches (an integer >= 1) or a fraction in (0, 1]"
        )
    if isinstance(limit, int):
        if limit < 1:
            raise ConfigError(f"debug.{key}={limit}: a count of batches must be >= 1")
        return min(limit, available)
    if not 0 < limit <= 1:
        raise ConfigError(f"debug.{key}={limit}: a fraction of the batches must be in (0, 1]")
    return max(1, math.floor(limit * available))


class LimitedLoader:
    """The first `n` batches of each pass over a loader; everything else (its sampler, its generator)
    is the loader's own."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class FixedBatches(LimitedLoader):
    """The first `n` batches of the first pass, kept and given again on every later pass."""

    def __init__(self, loader: Any, n: int) -> None:
        super().__init__(loader, n)
        self.kept: list[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        if self.kept is None:
            self.kept = list(super().__iter__())
        return iter(self.kept)


def limit_loaders(cfg: DictConfig, train_loader: Any, val_loader: Any) -> tuple[Any, Any]:
    """The train and val loaders as the debug options say (unchanged without them)."""
    overfit = _option(cfg, "overfit_batches", 0) or 0
    if isinstance(overfit, bool) or not isinstance(overfit, int) or overfit < 0:
        raise ConfigError(f"debug.overfit_batches={overfit!r} must be an integer >= 0 (0: off)")
    n_train = _batches(_option(cfg, "limit_train_batches"), len(train_loader), "limit_train_batches")
    n_val = _batches(_option(cfg, "limit_val_batches"), len(val_loader), "limit_val_batches")
    if overfit:
        train_loader = FixedBatches(train_loader, min(overfit, len(train_loader)))
        log.info(
            "debug: overfitting %d fixed train batch(es) of %d samples", len(train_loader), train_loader.batch_size
        )
    elif n_train is not None:
        train_loader = LimitedLoader(train_loader, n_train)
        log.info("debug: %d train batch(es) per epoch", n_train)
    if n_val is not None:
        val_loader = LimitedLoader(val_loader, n_val)
        log.info("debug: %d val batch(es) per epoch", n_val)
    return train_loader, val_loader


class OverfitCheck(Callback):
    """Says at the end whether the train loss on the fixed batches fell below `target`."""

    def __init__(self, target: float) -> None:
        self.target = float(target)

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if not trainer.dist.is_main or not trainer.history["train"]:
            return
        last = trainer.history["train"][-1]
        loss, epoch = last.get("loss"), last.get("epoch")
        if loss is not None and loss < self.target:
            log.info(
                "debug=overfit: the train loss on the fixed batches fell to %.4f (< %g) by epoch %s: the model "
                "and the data are wired so that it can learn",
                loss,
                self.target,
                epoch,
            )
        else:
            log.warning(
                "debug=overfit: the train loss on the fixed batches is %s after %s epoch(s), not below %g: the "
                "model cannot even memorize them. Look at the labels the loader yields, optim.lr, "
                "model.loss_weights and class weights, and whether the trainable modules get gradients "
                "(train_step/grad_norm); or give it more epochs (training.epochs=...)",
                "null" if loss is None else f"{loss:.4f}",
                epoch,
                self.target,
            )


class Profiler(Callback):
    """A torch.profiler trace of `active` optimizer steps after `wait` + `warmup` ones (rank 0).

    The trace (`<dir>/rank0.<time>.pt.trace.json`) opens in Perfetto (ui.perfetto.dev) or
    chrome://tracing, and in TensorBoard's PyTorch profiler plugin (torch-tb-profiler) under
    `tensorboard --logdir <run_dir>/tensorboard`.
    """

    def __init__(
        self,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        record_shapes: bool = True,
        profile_memory: bool = True,
        with_stack: bool = False,
        dir: str | None = None,
    ) -> None:
        for key, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"debug.profiler.{key}={value!r} must be an integer >= {low}")
        self.wait, self.warmup, self.active = wait, warmup, active
        self.options: dict[str, Any] = {
            "record_shapes": bool(record_shapes),
            "profile_memory": bool(profile_memory),
            "with_stack": bool(with_stack),
        }
        self.dir = dir
        self.prof: Any = None
        self.steps = 0
        self.path: Path | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        from torch.profiler import (
            ProfilerActivity,
            profile,
            schedule,
            tensorboard_trace_handler,
        )

        self.path = Path(self.dir) if self.dir else trainer.run.root / "tensorboard" / "profiler"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.path), worker_name="rank0"),
            **self.options,
        )
        self.prof.start()

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None:
        if self.prof is None or self.path is None:
            return
        self.prof.step()
        self.steps += 1
        if self.steps >= self.wait + self.warmup + self.active:
            self._stop()
            log.info(
                "profiler: a trace of steps %d-%d is in %s (open it in ui.perfetto.dev, or in TensorBoard with "
                "torch-tb-profiler: tensorboard --logdir %s)",
                self.wait + self.warmup + 1,
                self.steps,
                self.path,
                self.path.parent,
            )

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if self.prof is not None:
            self._stop()
            log.warning(
                "profiler: the run took %d optimizer step(s); a trace needs debug.profiler.wait + warmup + active = "
                "%d, so none was written",
                self.steps,
                self.wait + self.warmup + self.active,
            )

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        if self.prof is not None:
            self._stop()

    def _stop(self) -> None:
        prof, self.prof = self.prof, None
        prof.stop()


class AnomalyDetection(Callback):
    """Autograd anomaly detection (a NaN in backward names the forward op that made it) plus a finite
    check on every module's output and, after each step, on the trainable weights."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.previous: tuple[bool, bool] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.previous = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
        torch.autograd.set_detect_anomaly(True, check_nan=True)
        for name, module in trainer.model.named_modules():
            self.handles.append(module.register_forward_hook(_finite_output_hook(name or type(module).__name__)))
        log.info(
            "debug=anomaly: autograd anomaly detection on, finite checks on the outputs of %d modules",
            len(self.handles),
        )

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None:
        bad = [
            name
            for name, p in trainer.model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p.detach()).all())
        ]
        if bad:
            raise NonFiniteError(
                f"debug=anomaly: after optimizer step {step.global_step} the weights {', '.join(bad[:5])} "
                "hold NaN or inf; usual causes: optim.lr too high, fp16 overflow (training.amp_dtype=bfloat16)"
            )

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.previous is not None:
            torch.autograd.set_detect_anomaly(*self.previous)
            self.previous = None


def _finite_output_hook(name: str):
    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        for where, tensor in _tensors(output, ""):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"debug=anomaly: the output{where} of {name} ({type(module).__name__}) holds NaN or inf; "
                    "it is the first module to produce one, so the fault is in it or in the scale of its inputs"
                )

    return hook


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(value):
        yield where, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")


def build_debug_callbacks(cfg: DictConfig) -> list[Callback]:
    """The callbacks the selected debug mode needs (none without one).

    Raises:
        ConfigError: a `debug.*` value that cannot work, named (checked here, before anything loads).
    """
    for key in ("limit_train_batches", "limit_val_batches"):
        _batches(_option(cfg, key), 1, key)
    overfit = _option(cfg, "overfit_batches", 0) or 0
    if isinstance(overfit, bool) or not isinstance(overfit, int) or overfit < 0:
        raise ConfigError(f"debug.overfit_batches={overfit!r} must be an integer >= 0 (0: off)")
    target = _option(cfg, "overfit_loss", 0.05)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise ConfigError(f"debug.overfit_loss={target!r} must be a number > 0")
    callbacks: list[Callback] = []
    if _option(cfg, "overfit_batches", 0):
        callbacks.append(OverfitCheck(_option(cfg, "overfit_loss", 0.05)))
    profiler = _option(cfg, "profiler")
    if profiler:
        callbacks.append(Profiler(**cast(dict[str, Any], OmegaConf.to_container(profiler, resolve=True))))
    if _option(cfg, "anomaly", False):
        callbacks.append(AnomalyDetection())
    return callbacks
