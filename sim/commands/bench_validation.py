"""What the per-batch sample validation costs, next to a training step.

    python -m sim bench_validation                         # llm=tiny (the cheapest step: the worst case)
    python -m sim bench_validation llm=smollm2_135m_gguf llm.pretrained=false steps=10
    python -m sim bench_validation data=synthetic_frames vision=tiny

Any train.py override composes the model and data as training would. Timed, as medians over `steps`
batches after `warmup`: one training step (forward, loss, backward, optimizer step, zero_grad), the
check of a collated batch (what `__getitems__` datasets such as the cached and synthetic splits
give), and, for a dataset read sample by sample, the validated collate against the plain
`sim.data.dataset.collate_fn`. Prints the figures and whether validation stays under `budget` (2%) of a step.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig

from sim.core.cli import CONF_DIR, fail_cleanly
from sim.core.run import RunDir
from sim.data.dataset import collate_fn
from sim.data.validate import SampleValidator

if TYPE_CHECKING:
    from sim.training.trainer import Trainer

# The trainer and the metrics load torchmetrics and with it the hub libraries, which read
# HF_HUB_OFFLINE once, at import: they are imported where used, after `main` has set it.


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@dataclass
class _Batches:
    """The timed batches in each form validation meets them: collated as `__getitems__` gives them,
    as lists of sample dicts, and checked (what the training step runs on)."""

    indices: list[list[int]]
    raw: list[dict[str, Any]]
    samples: list[list[dict[str, Any]]]
    checked: list[dict[str, Any]]

    @classmethod
    def read(cls, dataset: Any, validator: SampleValidator, batch_size: int, n_batches: int) -> _Batches:
        indices = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(n_batches)]
        getitems = getattr(dataset, "__getitems__", None)
        raw = [getitems(idx) if getitems else collate_fn([dataset[i] for i in idx]) for idx in indices]
        samples = [[dataset[i] for i in idx] for idx in indices]
        checked = [validator.check_batch(b, idx).batch for b, idx in zip(raw, indices, strict=True)]
        # on_bad_sample=error: a bad sample raises, so every batch comes back whole.
        return cls(indices, raw, samples, [b for b in checked if b is not None])


def _time_step(trainer: Trainer, batches: list[dict[str, Any]], steps: int, warmup: int) -> float:
    """Median ms of one training step: the trainer's own `train_step` (forward, loss, backward, clip,
    optimizer step, zero_grad) on batches already checked."""
    from sim.evaluation.loop import to_device  # heavy, and after HF_HUB_OFFLINE is set (see the imports)
    from sim.training.step import train_step  # heavy, and after HF_HUB_OFFLINE is set

    trainer.model.train()
    on_device = itertools.cycle([to_device(b, trainer.device) for b in batches])

    def step() -> None:
        train_step(trainer.step, on_device, 1)

    for _ in range(warmup):
        step()
    return _median_ms(step, steps)


def _time_validation(validator: SampleValidator, b: _Batches, reps: int) -> tuple[float, float, float]:
    """Median ms of: checking a collated batch, the validated collate of sample dicts, the plain collate."""
    k = itertools.count()

    def check_collated() -> None:
        i = next(k) % len(b.raw)
        validator.check_batch(b.raw[i], b.indices[i])

    def check_samples() -> None:
        i = next(k) % len(b.samples)
        validator.check_samples(b.samples[i], b.indices[i])

    def plain_collate() -> None:
        collate_fn(b.samples[next(k) % len(b.samples)])

    return _median_ms(check_collated, reps), _median_ms(check_samples, reps), _median_ms(plain_collate, reps)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Set up a trainer from conf/bench_validation.yaml composed (a train config plus steps, warmup,
    budget) and time a step and the validation."""
    from sim.training.trainer import Trainer  # heavy, and after HF_HUB_OFFLINE is set (see the imports)

    steps, warmup, budget = int(cfg.steps), int(cfg.warmup), float(cfg.budget)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunDir(tmp))
        trainer.setup()
        dataset = trainer.data.train
        bs = int(trainer.data.batch_size)
        validator = SampleValidator(dataset.video_key, dataset.video_shape(), on_bad_sample="error")
        batches = _Batches.read(dataset, validator, bs, max(1, min(steps + warmup, len(dataset) // bs)))
        step_ms = _time_step(trainer, batches.checked, steps, warmup)
        collated_ms, per_sample_ms, plain_ms = _time_validation(validator, batches, max(steps, 50))
    return {
        "llm": cfg.llm.get("name_or_path") or cfg.llm.get("gguf_file"),
        "data": cfg.data.dataset_class_path,
        "batch_size": bs,
        "video_shape": list(dataset.video_shape()),
        "threads": torch.get_num_threads(),
        "step_ms": step_ms,
        "validate_collated_ms": collated_ms,
        "validate_per_sample_ms": per_sample_ms,
        "plain_collate_ms": plain_ms,
        "collated_share": collated_ms / step_ms,
        "per_sample_extra_share": max(per_sample_ms - plain_ms, 0.0) / step_ms,
        "budget": budget,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench_validation")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with fail_cleanly():
        r = run(cfg)
    print(
        f"validation cost: llm={r['llm']} data={r['data']} batch_size={r['batch_size']} "
        f"video {r['video_shape']} ({r['threads']} threads)"
    )
    print(f"  training step (forward, loss, backward, optimizer)   {r['step_ms']:9.3f} ms")
    print(
        f"  check of a collated batch (__getitems__ datasets)     {r['validate_collated_ms']:9.3f} ms"
        f"  = {100 * r['collated_share']:.2f}% of a step"
    )
    print(
        f"  validated collate of {r['batch_size']} sample dicts                {r['validate_per_sample_ms']:9.3f} ms"
        f"  (plain collate_fn {r['plain_collate_ms']:.3f} ms; extra {100 * r['per_sample_extra_share']:.2f}% of a step)"
    )
    ok = r["collated_share"] < r["budget"] and r["per_sample_extra_share"] < r["budget"]
    print(f"  {'within' if ok else 'OVER'} the budget of {100 * r['budget']:.0f}% of a training step")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
