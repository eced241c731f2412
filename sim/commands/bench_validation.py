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

import os
import statistics
import sys
import tempfile
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from sim.core.cli import CONF_DIR, fail_cleanly


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Set up a trainer from conf/bench_validation.yaml composed (a train config plus steps, warmup,
    budget) and time a step and the validation."""
    from sim.core.run import RunDir
    from sim.data.dataset import collate_fn
    from sim.data.validate import SampleValidator
    from sim.evaluation.loop import to_device
    from sim.evaluation.metrics import compute_losses
    from sim.training.trainer import Trainer

    steps, warmup, budget = int(cfg.steps), int(cfg.warmup), float(cfg.budget)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, RunDir(tmp))
        trainer.setup()
        data = trainer.data
        dataset = data.train
        bs = int(data.batch_size)
        n_batches = max(1, min(steps + warmup, len(dataset) // bs))
        index_lists = [list(range(i * bs, (i + 1) * bs)) for i in range(n_batches)]
        validator = SampleValidator(dataset.video_key, dataset.video_shape(), on_bad_sample="error")
        getitems = getattr(dataset, "__getitems__", None)
        raw = [getitems(idx) if getitems else collate_fn([dataset[i] for i in idx]) for idx in index_lists]
        samples = [[dataset[i] for i in idx] for idx in index_lists]
        batches = [validator.check_batch(b, idx).batch for b, idx in zip(raw, index_lists)]

        model, opt = trainer.model, trainer.optimizer
        model.train()
        it = iter(range(10**9))

        def step() -> None:
            batch = to_device(batches[next(it) % len(batches)], trainer.device)
            logits = trainer.forward(batch)  # under the model's own autocast, as the trainer's step
            losses = compute_losses(logits, batch, trainer.loss_weights, trainer.class_weights)
            losses["objective"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        step_ms = _median_ms(step, steps)
        k = iter(range(10**9))

        def check_collated() -> None:
            i = next(k) % len(raw)
            validator.check_batch(raw[i], index_lists[i])

        def check_samples() -> None:
            i = next(k) % len(samples)
            validator.check_samples(samples[i], index_lists[i])

        def plain_collate() -> None:
            collate_fn(samples[next(k) % len(samples)])

        reps = max(steps, 50)
        collated_ms = _median_ms(check_collated, reps)
        per_sample_ms = _median_ms(check_samples, reps)
        plain_ms = _median_ms(plain_collate, reps)
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
