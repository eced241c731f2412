"""Guards of a training run against faults that would otherwise pass silently.

- `NonFiniteGuard`: a step whose loss or gradients are NaN/inf is skipped and counted; too many in a
  row (`training.max_nonfinite_steps`) stop the run with a message that says what to look at.
- `check_finite_state`: refuses to write a checkpoint from non-finite weights, so the last good
  checkpoint on disk is never replaced by a ruined one.
- `OutputDirCheck`: a Hydra callback that refuses an unwritable `hydra.run.dir` / `hydra.sweep.dir`
  with a one-line message before anything loads.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from sim.core.config import check_writable_dir
from sim.core.errors import ConfigError, SimError

log = logging.getLogger(__name__)


class NonFiniteError(SimError, RuntimeError):
    """Training produced non-finite values it cannot recover from (the run stops, checkpoints intact)."""


def _grads_finite(parameters: Iterable[torch.Tensor], grad_norm: torch.Tensor | float | None) -> bool:
    if grad_norm is not None:
        # clip_grad_norm_ already reduced every gradient to one norm: non-finite iff any grad is.
        return bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # one fused kernel rather than a reduction per tensor
    return bool(torch.isfinite(torch.stack(norms)).all())


class NonFiniteGuard:
    """Decides, after backward (and unscale/clip), whether the optimizer may step.

    The decision reads only the gradients, which DDP has already all-reduced, so every rank decides
    alike (a rank that stopped alone would leave the others waiting). A non-finite loss shows up in
    the gradients it produced; `observe_loss` keeps such a micro-batch out of the epoch's metrics and
    names the loss as the cause.

    Without a grad scaler a faulty step is skipped here. With an enabled fp16 GradScaler the step
    goes to `scaler.step`, which skips it itself and lowers the scale; it is still counted, so a
    scaler that overflows `max_consecutive` times in a row (its scale cut by 2**max_consecutive)
    stops the run too.

    Args:
        max_consecutive: faulty steps in a row that stop the run (training.max_nonfinite_steps).

    Raises:
        ConfigError: max_consecutive < 1.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ConfigError(f"training.max_nonfinite_steps={max_consecutive!r} must be an integer >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # faulty steps in a row
        self.skipped = 0  # faulty steps in all
        self.steps = 0
        self._bad_loss: float | None = None  # a non-finite loss seen since the last step

    def observe_loss(self, loss: torch.Tensor) -> bool:
        """Record a micro-batch's loss. Returns whether it is finite (whether it may enter the metrics)."""
        value = loss.detach().float().reshape(-1)[0]
        if bool(torch.isfinite(value)):
            return True
        self._bad_loss = float(value)
        return False

    def should_step(
        self,
        parameters: Iterable[torch.Tensor],
        grad_norm: torch.Tensor | float | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> bool:
        """True: call scaler.step(optimizer) and scaler.update(). False: skip them (zero_grad still).

        Args:
            parameters: the trainable parameters (read only when `grad_norm` is not given).
            grad_norm: the total norm clip_grad_norm_ returned, if the step clipped.
            scaler: the step's GradScaler; an enabled one skips faulty steps itself.

        Raises:
            NonFiniteError: the limit of faulty steps in a row is reached.
        """
        self.steps += 1
        bad_loss, self._bad_loss = self._bad_loss, None
        scaling = scaler is not None and scaler.is_enabled()
        if _grads_finite(parameters, grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        what = f"loss ({bad_loss})" if bad_loss is not None else "gradients"
        log.warning(
            "step %d: non-finite %s; optimizer step skipped (%d in a row, %d in all; the run stops at %d in a row: "
            "training.max_nonfinite_steps)",
            self.steps,
            what,
            self.consecutive,
            self.skipped,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"training stopped: non-finite {what} in {self.consecutive} consecutive steps "
                f"(training.max_nonfinite_steps={self.max_consecutive}; {self.skipped} of {self.steps} steps skipped "
                "in all). "
                "No checkpoint was written from these weights; the checkpoints already on disk are intact. "
                "Usual causes: a learning rate too high (optim.lr), NaN or inf in the data "
                "(python -m sim check_data data=...), fp16 overflow (training.amp_dtype=bfloat16 or "
                "training.amp=false)."
            )
        return scaling


def check_finite_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, what: str = "checkpoint"
) -> None:
    """Refuse to save non-finite weights (or optimizer state).

    Raises:
        NonFiniteError: naming the tensors that hold NaN or inf.
    """
    state = getattr(model, "trainable_state_dict", model.state_dict)()
    bad = [
        name
        for name, t in state.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if optimizer is not None:
        for pid, pstate in optimizer.state_dict().get("state", {}).items():
            for key, t in pstate.items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"optimizer state[{pid}].{key}")
    if bad:
        raise NonFiniteError(
            f"refusing to write the {what}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the checkpoints already on disk are left as they were. "
            "Usual causes: a learning rate too high (optim.lr), NaN or inf in the data "
            "(python -m sim check_data data=...)."
        )


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; the guards above work without it
    _HydraCallback = object  # type: ignore[assignment,misc]


class OutputDirCheck(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (conf/train.yaml `hydra.callbacks`): an unwritable output directory is a
    one-line error before Hydra creates it, instead of a traceback from inside Hydra."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: Any, key: str) -> None:
        try:
            check_writable_dir(OmegaConf.select(config, key), key)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
