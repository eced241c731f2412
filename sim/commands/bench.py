"""Training-speed benchmark: how close a config's training step runs to this machine's limit.

    python -m sim bench llm=gpt2 llm.pretrained=false data=dummy data.batch_size=64 [options]

Options (conf/bench.yaml; the rest are train.py overrides):
    steps=N            timed training steps (default 20), after warmup=N untimed ones (default 3)
    reference=true     also time the naive loop (causal-LM with its LM head, output_hidden_states,
                       fp32 eager, trainable LLM weights) on the same model and batch, for comparison
    memory=N           also train one pass over a cached split of N samples written to a temp
                       directory (dv and F from the config) and report the process's anonymous RSS
    json=PATH          write the results as JSON (default: print only)

In one run it measures the fp32 and bf16 matmul peaks, times the real trainer's steps split into
data / forward / backward / optimizer, and reports samples/s, achieved FLOP/s and the model FLOPs
utilization (MFU) against the measured peak of the precision in use.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from sim.commands.bench_peer import time_lightning_peer
from sim.core.cli import CONF_DIR, command_line, compose, fail_cleanly
from sim.core.labels import LABELS
from sim.core.precision import dtype_name
from sim.core.run import RunDir
from sim.data.synthetic import generate
from sim.evaluation.loop import to_device
from sim.evaluation.metrics import compute_losses
from sim.models.last_row import last_row_weights
from sim.models.model import SimV0Model
from sim.models.packed import has_packed_layers, packed_conv1d_class
from sim.training.callbacks import Callback, StepInfo
from sim.training.step import train_step
from sim.training.trainer import Trainer

PHASES = ("data", "forward", "backward", "optimizer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """The fastest of repeated calls of `fn` within `seconds`, after one warm-up call."""
    fn()
    sync(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (the best of repeated runs within `seconds`)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, seconds)


def llm_matmul_shapes(llm: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every matmul weight of the base transformer (Linear, and GPT-2's transposed Conv1D)."""
    shapes = []
    for m in llm.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Embedding) or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if isinstance(m, torch.nn.Linear):
            shapes.append((w.shape[1], w.shape[0]))
        elif any(c.__name__ == "Conv1D" for c in type(m).__mro__):  # transformers' GPT-2 layer: weight [in, out]
            shapes.append((w.shape[0], w.shape[1]))
    return shapes


def shape_peak(
    shapes: Sequence[tuple[int, int]],
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    seconds: float = 0.2,
    packed: bool = False,
) -> float:
    """FLOP/s of the step's own matmuls alone: each distinct [rows, in] x [in, out] product timed like
    `matmul_peak`'s square one (`best_seconds`), combined as the LLM's layers weigh them (total FLOPs /
    total time). `packed`: through the packed GPT-2 layers the LLM uses (`llm.packed_weights`).
    Against the square peak it tells how much of the gap the matrix shapes explain."""
    flops = seconds_total = 0.0
    for (k, n), count in Counter(shapes).items():
        x = torch.randn(rows, k, device=device).to(dtype)
        layer: torch.nn.Module = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        if packed:  # as the LLM computes it: GPT-2's layer, packed (weight [in, out])
            layer = packed_conv1d_class()(n, k).to(device, dtype)
        layer.requires_grad_(False)
        best = best_seconds(partial(layer, x), device, seconds)
        flops += count * 2.0 * rows * k * n
        seconds_total += count * best
    return flops / seconds_total if seconds_total else 0.0


def llm_flops_per_token(llm: torch.nn.Module, tokens: int) -> float:
    """Forward FLOPs per token of the base transformer: 2 per weight of its matmuls, plus attention.

    Embedding tables are lookups, not matmuls, so they don't count.
    """
    emb = {id(m.weight) for m in llm.modules() if isinstance(m, torch.nn.Embedding)}
    matmul_params = sum(p.numel() for p in llm.parameters() if p.dim() >= 2 and id(p) not in emb)
    cfg = llm.config
    layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0)
    width = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0)
    attention = 2 * 2 * layers * tokens * width  # QK^T and AV, each 2*T*d per token per layer
    return 2.0 * matmul_params + attention


def prefix_tokens(model: SimV0Model) -> int:
    """The LLM's sequence length: K visual tokens, the telemetry token and the query token(s)."""
    return model.K + 1 + model.variant.n_queries


def skipped_flops(model: SimV0Model) -> float:
    """Forward FLOPs per sample the LLM does not compute: the last layer's rows nobody reads
    (`sim.models.last_row`), when the model skips them."""
    if not model.reads_last_row_only():
        return 0.0
    return 2.0 * last_row_weights(model.llm) * (prefix_tokens(model) - 1)


def matmul_flops(model: SimV0Model, batch_size: int) -> float:
    """FLOPs of one step's linear-layer matmuls in the LLM (forward and the input's gradient), the
    work `OP_KINDS["matmuls"]` times: `step_flops` without attention and the trainable modules."""
    rows = batch_size * prefix_tokens(model)
    forward = sum(2.0 * rows * k * n for k, n in llm_matmul_shapes(model.llm)) - batch_size * skipped_flops(model)
    return 2 * forward


def step_flops(model: SimV0Model, batch_size: int) -> float:
    """Model FLOPs of one training step: the frozen LLM's forward and its backward to the inputs
    (about one more forward: no weight gradients), plus 3x the trainable modules' forward. Work the
    model skips (the last layer's unread rows) is not counted."""
    tokens = prefix_tokens(model)
    llm = llm_flops_per_token(model.llm, tokens) * tokens - skipped_flops(model)
    trainable = 2.0 * sum(p.numel() for p in model.trainable_parameters() if p.dim() >= 2)
    return batch_size * (2 * llm + 3 * trainable)


class PhaseTimer:
    """`train_step`'s mark hook: the seconds of each phase, the device synchronized at every mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.counting = False  # off during warm-up
        self._last = time.perf_counter()

    def start(self) -> None:
        sync(self.device)
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self.counting:
            self.seconds[phase] += now - self._last
        self._last = now


def endless_batches(trainer: Trainer) -> Iterator[dict[str, Any]]:
    """The train loader's batches on the device, round and round; empty ones (all samples skipped) left out."""
    while True:
        for batch in trainer.loaders.train:
            if batch:
                yield to_device(batch, trainer.device)


def time_trainer_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, Any]:
    """Time the trainer's own step (`train_step`) phase by phase: data, forward, backward, optimizer."""
    trainer.model.train()
    timer, samples = PhaseTimer(trainer.device), 0

    def count(out: Any, batch: dict[str, Any], losses: Any, finite: bool) -> None:
        nonlocal samples
        samples += batch["telemetry"].shape[0] if timer.counting else 0

    batches = endless_batches(trainer)
    for i in range(warmup + steps):
        timer.counting = i >= warmup
        timer.start()
        train_step(trainer.step, batches, trainer.settings.grad_accum, on_micro=count, mark=timer)
    total = sum(timer.seconds.values())
    return {
        "samples": samples,
        "seconds": total,
        "samples_per_s": samples / total,
        "phase_ms_per_step": {k: 1000 * v / steps for k, v in timer.seconds.items()},
    }


def time_naive_reference(trainer: Trainer, steps: int, warmup: int) -> dict[str, Any]:
    """The naive loop: a causal-LM model (LM head included) asked for all hidden states, fp32,
    eager, its weights left trainable (so backward computes their gradients too)."""
    from transformers import AutoModelForCausalLM

    model = trainer.model
    config = model.llm.config
    with torch.random.fork_rng(devices=[]):
        lm = AutoModelForCausalLM.from_config(config).to(trainer.device, torch.float32)
    lm.load_state_dict(model.llm.state_dict(), strict=False)
    lm.train()
    batch = to_device(next(iter(trainer.loaders.train)), trainer.device)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    elapsed, samples = 0.0, 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x = model.prefix(batch).float()
        out = lm(inputs_embeds=x, output_hidden_states=True, use_cache=False)
        h = model.head_norm(out.hidden_states[-1][:, -1])
        logits = {f"{k}_logits": model.heads[k](h) for k in ("risk", "reason", "action")}
        logits["confidence_logits"] = model.heads["confidence"](h.detach()).squeeze(-1)
        loss = compute_losses(logits, batch, trainer.loss_weights)["objective"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm.zero_grad(set_to_none=True)
        sync(trainer.device)
        if i >= warmup:
            elapsed += time.perf_counter() - t0
            samples += batch["telemetry"].shape[0]
    return {"samples_per_s": samples / elapsed, "seconds": elapsed}


def rss_anon_bytes() -> int | None:
    """Anonymous resident memory of this process (mapped file pages excluded), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssPeak(Callback):
    """The highest anonymous RSS seen, sampled every 50 optimizer steps."""

    def __init__(self) -> None:
        self.peak = 0

    def sample(self) -> int | None:
        now = rss_anon_bytes()
        self.peak = max(self.peak, now or 0)
        return now

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None:
        if step.global_step % 50 == 0:
            self.sample()


def write_cached_splits(root: Path, n_samples: int, F: int, dv: int) -> None:
    """Synthetic cached splits under `root`: train of `n_samples`, val of 1024, vis_feats memory-mapped."""
    chunk = 10_000
    for split, n in (("train", n_samples), ("val", 1024)):
        out = root / split
        out.mkdir()
        vis = np.lib.format.open_memmap(out / "vis_feats.npy", mode="w+", dtype=np.float16, shape=(n, F, dv))
        tel: list[np.ndarray] = []
        labels: dict[str, list[np.ndarray]] = {h: [] for h in ("risk", "reason", "action")}
        for lo in range(0, n, chunk):
            a = generate(min(chunk, n - lo), F=F, dv=dv, seed=lo, split=split)
            vis[lo : lo + len(a["telemetry"])] = a["vis_feats"]
            tel.append(a["telemetry"])
            for h in labels:
                labels[h].append(a[f"{h}_id"])
        vis.flush()
        del vis
        np.save(out / "telemetry.npy", np.concatenate(tel))
        for h, parts in labels.items():
            np.save(out / f"{h}_id.npy", np.concatenate(parts))
        (out / "meta.json").write_text(json.dumps({"format_version": 1, "dv": dv, "F": F, "labels": LABELS}))


def memory_check(overrides: Sequence[str], n_samples: int, F: int, dv: int) -> dict[str, Any]:
    """Train one epoch over an N-sample cached split on disk and watch anonymous RSS.

    `overrides` is the command line: the run is the model it names, on the cached split instead.
    """
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp:
        root = Path(tmp)
        write_cached_splits(root, n_samples, F, dv)
        size = sum(f.stat().st_size for f in (root / "train").iterdir())
        cached = ["data=cached", f"data.train_split_path={root / 'train'}", f"data.val_split_path={root / 'val'}"]
        rss = RssPeak()
        trainer = Trainer(compose("bench", [*overrides, *cached]), RunDir(root / "run"), [rss])
        trainer.setup()
        base = rss.sample()
        t0 = time.perf_counter()
        trainer.train_epoch(1)
        seconds = time.perf_counter() - t0
        rss.sample()
        return {
            "samples": n_samples,
            "split_bytes_on_disk": size,
            "steps": trainer.global_step,
            "seconds": seconds,
            "rss_anon_after_setup": base,
            "rss_anon_peak": rss.peak,
        }


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Matmul peaks, the trainer's timed steps and, with `memory`, the memory check; returns the figures
    `print_table` shows.

    Args:
        cfg: conf/bench.yaml composed with `overrides` (a train config plus steps, warmup, reference, ...).
        overrides: the command line; the memory check composes its cached-split run from it.
    """
    steps, warmup = int(cfg.steps), int(cfg.warmup)
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp:
        trainer = Trainer(cfg, RunDir(tmp))
        trainer.setup()
        device = trainer.device
        compute_dtype = trainer.precision.autocast or trainer.model.llm_dtype
        peaks = {"float32": matmul_peak(torch.float32, device)}
        bf16_n = 2048 if compute_dtype == torch.bfloat16 else 256  # emulated bf16 is slow: keep it short
        peaks["bfloat16"] = matmul_peak(torch.bfloat16, device, n=bf16_n)
        timing = time_trainer_steps(trainer, steps, warmup)
        flops = step_flops(trainer.model, int(cfg.data.batch_size))
        achieved = flops * timing["samples_per_s"] / int(cfg.data.batch_size)
        peak = peaks["bfloat16" if compute_dtype == torch.bfloat16 else "float32"]
        rows = int(cfg.data.batch_size) * prefix_tokens(trainer.model)
        packed = has_packed_layers(trainer.model.llm)
        at_shapes = shape_peak(llm_matmul_shapes(trainer.model.llm), rows, compute_dtype, device, packed=packed)
        result: dict[str, Any] = {
            "config": {
                "llm": trainer.model.metadata()["llm_name"],
                "batch_size": int(cfg.data.batch_size),
                "K": trainer.model.K,
                "llm_dtype": dtype_name(trainer.model.llm_dtype),
                "autocast": dtype_name(trainer.precision.autocast) if trainer.precision.autocast else "off",
                "compile": trainer.compile_choice.enabled,
                "device": str(device),
                "threads": torch.get_num_threads(),
            },
            "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
            "train": timing,
            "step_gflop": flops / 1e9,
            "achieved_gflops": achieved / 1e9,
            "mfu": achieved / peak,
            "shape_peak_gflops": at_shapes / 1e9,
            "mfu_of_shape_peak": achieved / at_shapes if at_shapes else None,
        }
        if cfg.reference:
            ref = time_naive_reference(trainer, max(3, steps // 2), 1)
            result["naive_reference"] = ref
            result["speedup_vs_naive"] = timing["samples_per_s"] / ref["samples_per_s"]
        if cfg.get("peer"):
            result["peer"] = alternate_with_peer(trainer, cfg, int(cfg.peer), steps, warmup)
        if cfg.get("profile"):
            result["profile"] = where_time_goes(trainer, int(cfg.profile))
            matmul_s = result["profile"]["kinds"]["matmuls"] * timing["seconds"] / steps
            result["matmul_gflops_in_step"] = (
                matmul_flops(trainer.model, int(cfg.data.batch_size)) / matmul_s / 1e9 if matmul_s else None
            )
    if cfg.memory:
        result["memory"] = memory_check(overrides, int(cfg.memory), trainer.model.F, trainer.model.dv)
    return result


def alternate_with_peer(trainer: Trainer, cfg: DictConfig, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    """SIM's step and the Lightning peer's, timed in turn `rounds` times (so both see the same machine
    load); the medians and their ratio."""
    sim_runs, peer_runs = [], []
    for _ in range(rounds):
        sim_runs.append(time_trainer_steps(trainer, steps, warmup)["samples_per_s"])
        peer = time_lightning_peer(cfg, trainer.model.dv, trainer.loaders.train, trainer.loss_weights, steps, warmup)
        peer_runs.append(peer["samples_per_s"])
    sim_median, peer_median = float(np.median(sim_runs)), float(np.median(peer_runs))
    return {
        "sim_samples_per_s": sim_runs,
        "lightning_samples_per_s": peer_runs,
        "lightning": peer["lightning"],
        "speedup_vs_lightning": sim_median / peer_median,
    }


# Operators by what they do, for the profile's summary (the rest is "other").
OP_KINDS = {
    "matmuls": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear"),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::baddbmm"),
    "activations": ("aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward"),
    "norms": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_fused_rms_norm"),
    "copies": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous"),
    "optimizer": ("aten::_fused_adamw_",),
}


def where_time_goes(trainer: Trainer, top: int) -> dict[str, Any]:
    """Over 5 profiled steps: the `top` operators by self CPU time with their share of the total, and
    the shares of each kind of work (`OP_KINDS`)."""
    from torch.profiler import ProfilerActivity, profile  # only when asked: the profiler is heavy to import

    time_trainer_steps(trainer, 2, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_trainer_steps(trainer, 5, 0)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for e in events:
        kinds[kind_of.get(e.key, "other")] += e.self_cpu_time_total / total
    return {
        "ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in rows],
        "kinds": kinds,
    }


def print_table(r: dict[str, Any]) -> None:
    c, t = r["config"], r["train"]
    rows = [
        (
            "config",
            f"{c['llm']}, batch {c['batch_size']}, K={c['K']}, weights {c['llm_dtype']}, autocast {c['autocast']}, "
            f"compile {c['compile']}, {c['device']} x{c['threads']} threads",
        ),
        ("matmul peak fp32", f"{r['matmul_peak_gflops']['float32']:.1f} GFLOP/s"),
        ("matmul peak bf16", f"{r['matmul_peak_gflops']['bfloat16']:.1f} GFLOP/s"),
        ("train samples/s", f"{t['samples_per_s']:.1f}"),
        ("step time (ms)", "  ".join(f"{k} {v:.1f}" for k, v in t["phase_ms_per_step"].items())),
        ("model GFLOP / step", f"{r['step_gflop']:.1f}"),
        ("achieved", f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['mfu']:.1f}% of the measured peak (MFU)"),
    ]
    if r.get("mfu_of_shape_peak"):
        rows.append(
            (
                "matmul peak, step's shapes",
                f"{r['shape_peak_gflops']:.1f} GFLOP/s (the LLM's matmuls alone at {c['batch_size']} x tokens rows); "
                f"achieved = {100 * r['mfu_of_shape_peak']:.1f}% of it",
            )
        )
    if "naive_reference" in r:
        rows.append(("naive loop samples/s", f"{r['naive_reference']['samples_per_s']:.1f}"))
        rows.append(("speed-up vs naive", f"{r['speedup_vs_naive']:.2f}x"))
    if "peer" in r:
        p = r["peer"]
        rows.append(("SIM, alternating", "  ".join(f"{v:.1f}" for v in p["sim_samples_per_s"]) + " samples/s"))
        rows.append(
            (f"Lightning {p['lightning']}", "  ".join(f"{v:.1f}" for v in p["lightning_samples_per_s"]) + " samples/s")
        )
        rows.append(("speed-up vs Lightning", f"{p['speedup_vs_lightning']:.2f}x (medians)"))
    if "profile" in r:
        step_ms = sum(t["phase_ms_per_step"].values())
        for kind, share in r["profile"]["kinds"].items():
            rows.append((f"time in {kind}", f"{100 * share:.1f}% of CPU time, about {share * step_ms:.1f} ms a step"))
        if r.get("matmul_gflops_in_step"):
            rows.append(
                (
                    "matmuls in the step",
                    f"about {r['matmul_gflops_in_step']:.0f} GFLOP/s (the LLM's matmul FLOPs over their share of "
                    "the step)",
                )
            )
        for op in r["profile"]["ops"]:
            rows.append((f"  {op['op'][:40]}", f"{100 * op['share']:.1f}% of CPU time ({op['calls']} calls)"))
    if "memory" in r:
        m = r["memory"]
        rows.append(
            (
                "cached split",
                f"{m['samples']:,} samples, {m['split_bytes_on_disk'] / 2**30:.2f} GiB on disk, "
                f"{m['steps']} steps in {m['seconds']:.0f} s",
            )
        )
        rows.append(
            (
                "RssAnon peak",
                f"{(m['rss_anon_peak'] or 0) / 2**20:.0f} MiB "
                f"(after setup {(m['rss_anon_after_setup'] or 0) / 2**20:.0f} MiB)",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        result = run(cfg, command_line())
    print_table(result)
    if cfg.json:
        Path(str(cfg.json)).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
