"""The one evaluation loop: the trainer's per-epoch validation and evaluate.py both run it, so an
evaluation of a checkpoint computes exactly what the run logged for that epoch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm import tqdm

from sim.evaluation.metrics import EpochMetrics, compute_losses

BatchHook = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], None]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (non-blocking from pinned memory on CUDA); other values as they are."""
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.inference_mode()
def evaluate_batches(
    forward: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]],
    loader: Iterable[Mapping[str, Any]],
    device: torch.device,
    tracker: EpochMetrics,
    loss_weights: Mapping[str, float],
    class_weights: Mapping[str, torch.Tensor] | None = None,
    on_batch: BatchHook | None = None,
    desc: str = "val",
    progress_bar: bool | None = None,
) -> None:
    """Accumulate the metrics of `forward` over `loader` into `tracker` (reset first).

    The caller puts the model in eval mode; the model computes in its own precision.

    Args:
        forward: the model (or its compiled / unwrapped form).
        on_batch: called with (logits, batch) after each batch, e.g. to keep per-sample outputs.
        progress_bar: None shows a bar where stderr is a terminal; False never.
    """
    tracker.reset()
    bar = tqdm(
        loader,
        desc=desc,
        leave=False,
        disable=None if progress_bar is None else not progress_bar,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for batch in bar:
        if not batch:  # every sample of it skipped (data.on_bad_sample=skip)
            continue
        batch = to_device(batch, device)
        logits = forward(batch)
        losses = compute_losses(logits, batch, loss_weights, class_weights)
        tracker.update(logits, batch, losses)
        if on_batch is not None:
            on_batch(logits, batch)
