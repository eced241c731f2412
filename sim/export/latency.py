"""Batch-1 CPU latency of the whole SIM model, per backend, and what each one's decisions lose.

    python -m sim bench_latency checkpoint=PATH [data=...]                  # a trained model
    python -m sim bench_latency llm=gpt2 llm.pretrained=false [F=8 K=4]     # an architecture, random heads
    options: backends=eager_fp32,eager_bf16,onnx_fp32,onnx_int8  windows=100  warmup=10  threads=0 (all)
             onnx_dir=DIR (keep the exported files)  report=FILE.json

Each backend decides on the same `windows` windows of the split (the data option's val split), one at
a time; the table gives milliseconds per window (median, p90), the bytes of weights it reads, and the
agreement of its predicted labels (risk, reason, action) with PyTorch eager in the precision the
checkpoint was trained in (see `sim.core.precision`), plus the largest
logit difference. The ONNX backends need the optional extra: pip install -e ".[onnx]".

At batch 1 every weight is read once per window, so latency follows the bytes of weights more than
the arithmetic: int8 weights read a quarter of fp32's. bf16 halves them too, but is only fast on
hardware that computes it natively (AMX, AVX512-BF16, recent GPUs); elsewhere it is emulated.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from sim.core.checkpoint import load_checkpoint
from sim.core.cli import CONF_DIR, comma_lists, fail_cleanly
from sim.core.errors import ConfigError
from sim.core.precision import cpu_has_fast_bf16, named_precision
from sim.data.dataset import open_split
from sim.evaluation.evaluate import check_llm_override, split_for_checkpoint, split_loader
from sim.export.onnx import (
    OUTPUTS,
    compare,
    example_inputs,
    export_model,
    model_key,
    quantize_int8,
    require_onnx,
    run_session,
    session,
)
from sim.models.llm import describe
from sim.models.model import SimV0Model

log = logging.getLogger(__name__)

BACKENDS = ("eager_fp32", "eager_bf16", "onnx_fp32", "onnx_int8", "onnx_int8_pc")
Runner = Callable[[torch.Tensor, torch.Tensor], dict[str, np.ndarray]]


def build_model(cfg: DictConfig) -> tuple[Any, Any, str]:
    """(model, dataset, description): from `cfg.checkpoint`, or a `cfg.llm` architecture with random heads."""
    split = str(cfg.split)
    if cfg.checkpoint is not None:
        path = Path(str(cfg.checkpoint))
        ckpt = load_checkpoint(path)
        check_llm_override(cfg.get("llm"), ckpt["metadata"]["llm"], path)
        dataset = split_for_checkpoint(cfg, ckpt["metadata"], split, path)
        model = SimV0Model.from_checkpoint(path)
        return model, dataset, f"checkpoint {path} ({describe(ckpt['metadata']['llm'])})"
    if cfg.get("llm") is None:
        raise ConfigError("give checkpoint=PATH, or llm=NAME to time an architecture with random heads")
    F, K = int(cfg.F), int(cfg.K)
    OmegaConf.update(cfg, "model.F", F, force_add=True)
    dataset = open_split(cfg.data, split, True)
    dv = int(dataset.video_shape()[-1])
    llm = instantiate(cfg.llm, _convert_="all")
    torch.manual_seed(0)
    model = SimV0Model(dv=dv, F=F, K=K, llm=llm)
    tel = dataset.telemetry_array()
    model.set_telemetry_stats(torch.from_numpy(tel.mean(0)).float(), torch.from_numpy(tel.std(0)).float())
    return model.eval(), dataset, f"{describe(llm.sim_spec)} with random heads (F={F}, K={K}, dv={dv})"


def windows_of(dataset: Any, n: int, key: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` windows of a split, each as a batch of one (read and checked as training reads them)."""
    out = []
    for batch in split_loader(OmegaConf.create({}), dataset, batch_size=1):
        out.append((batch[key], batch["telemetry"].float()))
        if len(out) >= n:
            break
    return out


def torch_runner(model: Any) -> Runner:
    key = model_key(model)

    @torch.inference_mode()
    def run(video: torch.Tensor, tel: torch.Tensor) -> dict[str, np.ndarray]:
        out = model({key: video, "telemetry": tel})
        return {n: out[n].float().numpy() for n in OUTPUTS}

    return run


def onnx_runner(path: Path, threads: int) -> Runner:
    sess = session(path, threads)
    return lambda video, tel: run_session(sess, video.numpy(), tel.numpy())


def time_backend(
    run: Runner, windows: list[tuple[torch.Tensor, torch.Tensor]], warmup: int
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Per-window wall times (ms) and the logits of every window."""
    for i in range(warmup):
        run(*windows[i % len(windows)])
    times, outs = [], []
    for video, tel in windows:
        t0 = time.perf_counter()
        outs.append(run(video, tel))
        times.append((time.perf_counter() - t0) * 1e3)
    return times, {n: np.concatenate([o[n] for o in outs]) for n in OUTPUTS}


def weight_bytes(model: Any) -> int:
    """Bytes of the weights a forward reads: the LLM's token-embedding table is never read (SIM feeds
    inputs_embeds), and the ONNX graph drops it, so it is not counted."""
    unused = {id(p) for p in model.llm.get_input_embeddings().parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in unused)


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def backend_names(value: str | list[str] | ListConfig) -> list[str]:
    """`backends` as names: a list, or one name (or a comma list) typed as a string."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [b.strip() for b in items if b.strip()]


def export_fp32(model: SimV0Model, windows: list[Any], out_dir: Path) -> Path:
    """The model as one fp32 ONNX graph in `out_dir` (exported anew: a graph left there may be another model's)."""
    key = model_key(model)
    batch = {key: torch.cat([w[0] for w in windows[:2]]), "telemetry": torch.cat([w[1] for w in windows[:2]])}
    fp32 = copy.deepcopy(model)
    fp32.set_precision(named_precision("fp32"))
    return export_model(fp32, out_dir / "sim_v0.onnx", example_inputs(fp32, batch))


def _run_backend(
    backend: str, model: SimV0Model, windows: list[Any], warmup: int, out_dir: Path, threads: int
) -> tuple[list[float], dict[str, np.ndarray], int]:
    """(ms per window, logits, bytes of weights read) of one backend on `windows`."""
    if backend in ("eager_fp32", "eager_bf16"):
        variant = copy.deepcopy(model)
        variant.set_precision(named_precision(backend.removeprefix("eager_")))
        if backend == "eager_bf16":  # what a bf16 deployment holds: every weight in bf16
            variant.to(torch.bfloat16)
        times, logits = time_backend(torch_runner(variant), windows, warmup)
        return times, logits, weight_bytes(variant)
    fp32_path = out_dir / "sim_v0.onnx"  # exported by `export_fp32` before the first ONNX backend
    path = fp32_path
    if backend != "onnx_fp32":
        per_channel = backend == "onnx_int8_pc"
        path = quantize_int8(fp32_path, out_dir / f"sim_v0.{backend.removeprefix('onnx_')}.onnx", per_channel)
    times, logits = time_backend(onnx_runner(path, threads), windows, warmup)
    return times, logits, file_bytes(path)


def checked_backends(value: str | list[str] | ListConfig) -> list[str]:
    """The backend names asked for, each known (the ONNX ones need the onnx extra).

    Raises:
        ConfigError: an unknown backend.
    """
    backends = backend_names(value)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"backends: unknown {unknown}; expected some of {', '.join(BACKENDS)}")
    if any(b.startswith("onnx") for b in backends):
        require_onnx()
    return backends


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Time every backend of `cfg.backends` on the same windows; returns the report (see the module docstring).

    Args:
        cfg: conf/bench_latency.yaml composed (checkpoint or llm, data, split, backends, windows, ...).

    Raises:
        ConfigError: an unknown backend, or neither a checkpoint nor an LLM to time.
    """
    backends = checked_backends(cfg.backends)
    n_windows, warmup, threads = int(cfg.windows), int(cfg.warmup), int(cfg.threads)
    onnx_dir = cfg.onnx_dir or None
    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    model, dataset, what = build_model(cfg)
    model = model.eval()
    key = model_key(model)
    windows = windows_of(dataset, n_windows, key)
    # Agreement is measured against the precision the checkpoint was trained and validated in.
    reference = model.precision
    log.info("timing %s on %d windows of %s, %d threads", what, len(windows), dataset.describe(), threads)
    _, ref = time_backend(torch_runner(model), windows, warmup)
    tmp = None if onnx_dir else tempfile.TemporaryDirectory(prefix="sim-onnx-")
    out_dir = Path(str(onnx_dir)) if tmp is None else Path(tmp.name)
    results: dict[str, Any] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    try:
        if any(b.startswith("onnx") for b in backends):
            export_fp32(model, windows, out_dir)
        for backend in backends:
            times, outputs[backend], nbytes = _run_backend(backend, model, windows, warmup, out_dir, threads)
            agreement = compare(ref, outputs[backend])
            results[backend] = {
                "ms_median": float(np.median(times)),
                "ms_p90": float(np.percentile(times, 90)),
                "ms_mean": float(np.mean(times)),
                "weights_mb": nbytes / 1e6,
                "label_agreement": agreement["label_agreement"],
                "max_abs_logit_diff": agreement["max_abs_logit_diff_all"],
            }
            log.info("%s: %.2f ms/window (median)", backend, results[backend]["ms_median"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    if "eager_fp32" in outputs:  # every backend against eager fp32 too: what an fp32 deployment decides
        for backend, logits in outputs.items():
            results[backend]["label_agreement_vs_fp32"] = compare(outputs["eager_fp32"], logits)["label_agreement"]
    return {
        "model": what,
        "windows": len(windows),
        "threads": threads,
        "fast_bf16": cpu_has_fast_bf16(),
        "reference_precision": reference.name,
        "torch": torch.__version__,
        "backends": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: batch 1, {report['windows']} windows, {report['threads']} threads"
        + ("" if report["fast_bf16"] else " (this CPU has no native bf16: bf16 is emulated)"),
        f"{'backend':<12} {'ms median':>10} {'ms p90':>8} {'weights MB':>11}  agreement vs eager "
        f"{report.get('reference_precision', 'fp32')} (risk/reason/action)  max |dlogit|  vs eager fp32",
    ]
    for name, r in report["backends"].items():
        a, f = r["label_agreement"], r.get("label_agreement_vs_fp32")
        vs_fp32 = "" if f is None else f"  {f['risk']:.4f} / {f['reason']:.4f} / {f['action']:.4f}"
        lines.append(
            f"{name:<12} {r['ms_median']:>10.2f} {r['ms_p90']:>8.2f} {r['weights_mb']:>11.1f}  "
            f"{a['risk']:.4f} / {a['reason']:.4f} / {a['action']:.4f}{'':>18}{r['max_abs_logit_diff']:.2e}{vs_fp32}"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench_latency")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        report = bench(cfg)
    print(format_table(report))
    if cfg.report:
        Path(str(cfg.report)).write_text(json.dumps(report, indent=2) + "\n")


def cli() -> None:
    """The command line: `backends=a,b` as users type it, then the Hydra main."""
    sys.argv[1:] = comma_lists(sys.argv[1:], ["backends"])
    main()


if __name__ == "__main__":
    cli()
