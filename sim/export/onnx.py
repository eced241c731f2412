"""Export the whole SIM model (frozen LLM and encoder included) to ONNX, and check it against PyTorch.

    python -m sim export_onnx checkpoint=PATH out=FILE.onnx [quantize=true] [parity_samples=512]
                              [data=... data.val_split_path=...] [split=val]

The graph takes `vis_feats [B, F, dv]` float32 (or `frames [B, F, 3, H, W]` for a raw-frames model)
and `telemetry [B, 8]` float32 (raw: the normalization is inside), with a dynamic batch, and returns
risk_logits [B, 4], reason_logits [B, 4], action_logits [B, 6], confidence_logits [B].

After the export the command runs ONNX Runtime and PyTorch fp32 on the split (the data option's val
split unless told otherwise) and prints the parity report: max abs logit difference per head and
the agreement of predicted labels. `quantize=true` also writes FILE.int8.onnx (ONNX Runtime dynamic
int8 quantization of the weights) and reports what its decisions lose.

Needs the optional extra: pip install -e ".[onnx]" (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint
from sim.core.cli import CONF_DIR, fail_cleanly, require
from sim.core.errors import ConfigError, SimError
from sim.core.precision import named_precision
from sim.evaluation.evaluate import check_llm_override, split_for_checkpoint, split_loader
from sim.models.model import SimV0Model

log = logging.getLogger(__name__)

OUTPUTS = ("risk_logits", "reason_logits", "action_logits", "confidence_logits")
# A single .onnx file holds at most 2 GB; bigger models keep their weights in FILE.data beside it.
SINGLE_FILE_LIMIT = 1_800_000_000
MAX_BATCH = 4096  # the largest batch an exported graph accepts


class OnnxRuntimeMissing(SimError, ImportError):
    """The optional `onnx` extra is not installed."""


def require_onnx() -> Any:
    """Import onnxruntime, or say how to install the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise OnnxRuntimeMissing(
            f'ONNX export needs the optional extra: pip install -e ".[onnx]" (onnx, onnxruntime, onnxscript); {exc}'
        ) from None
    return onnxruntime


def model_key(model: SimV0Model) -> str:
    """The video input a model reads: cached features or raw frames."""
    return "vis_feats" if model.use_cached_vis_feats else "frames"


class ExportWrapper(nn.Module):
    """Positional tensors in, a tuple of logits out: the signature an ONNX graph has."""

    def __init__(self, model: SimV0Model) -> None:
        super().__init__()
        self.model = model
        self.video_key = model_key(model)

    def forward(self, video: torch.Tensor, telemetry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model({self.video_key: video, "telemetry": telemetry})
        return tuple(out[name].float() for name in OUTPUTS)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter warns about optional operator libraries SIM does not use; keep the console readable."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime", "")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def example_inputs(
    model: SimV0Model, batch: dict[str, Any] | None = None, size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace with: `size` windows of a real batch, or random ones of the model's shapes.

    The batch is at least 2: an example of batch 1 would let the tracer fix the batch size to 1.
    """
    key = model_key(model)
    if batch is not None and batch[key].shape[0] >= size:
        return batch[key][:size].contiguous(), batch["telemetry"][:size].float().contiguous()
    g = torch.Generator().manual_seed(0)
    if key == "vis_feats":
        video = torch.randn(size, model.F, model.dv, generator=g)
    else:
        raise ConfigError("exporting a raw-frames model needs a batch of real frames to trace with (data=...)")
    return video, torch.randn(size, 8, generator=g)


def export_model(
    model: SimV0Model, out: str | Path, example: tuple[torch.Tensor, torch.Tensor], opset: int | None = None
) -> Path:
    """Export `model` (eval mode, fp32) to `out` with a dynamic batch dimension.

    Returns:
        The path of the .onnx file (its weights sit in `out`.data beside it when over 2 GB).
    """
    require_onnx()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    video_name = wrapper.video_key
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with quiet_exporter(), one_encoder_pass(model), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            wrapper,
            example,
            str(out),
            input_names=[video_name, "telemetry"],
            output_names=list(OUTPUTS),
            dynamic_shapes={"video": {0: batch}, "telemetry": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=n_bytes > SINGLE_FILE_LIMIT,
            verbose=False,
        )
    log.info("exported %s (%.0f MB of weights) in %.1f s", out, n_bytes / 1e6, time.perf_counter() - t0)
    fixed = static_batch(out)
    if fixed is not None:
        log.warning(
            "the exported graph has a fixed batch of %d (something in the model fixed it); feed it exactly "
            "that many windows",
            fixed,
        )
    return out


@contextlib.contextmanager
def one_encoder_pass(model: SimV0Model) -> Iterator[None]:
    """A raw-frames encoder feeds its frames through in chunks, a Python loop over B*F that the tracer
    can only unroll for the example's batch size. While exporting, all frames go through in one pass
    (the same preprocessing and backbone; the parity check compares against the chunked forward)."""
    encoder = getattr(model, "vision", None)
    if encoder is None or not (hasattr(encoder, "preprocess") and hasattr(encoder, "embed")):
        yield
        return

    def whole(frames: torch.Tensor) -> torch.Tensor:
        B, F = frames.shape[:2]
        flat = frames.reshape(B * F, *frames.shape[2:])
        return encoder.embed(encoder.preprocess(flat)).float().reshape(B, F, -1)

    encoder.forward = whole  # an instance attribute shadows the method for this export only
    try:
        yield
    finally:
        del encoder.forward


def static_batch(path: str | Path) -> int | None:
    """The batch size an exported graph is fixed to, or None when its batch dimension is free."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = False) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights (one scale per tensor, or per output channel
    with `per_channel`), activations quantized on the fly per batch."""
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    external = src.with_name(src.name + ".data").is_file()
    t0 = time.perf_counter()
    # The exporter records intermediate shapes that onnx's own shape inference (which the quantizer
    # runs first) disagrees with; ONNX Runtime infers them again at load, so they are dropped.
    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    plain = dst.with_name(dst.stem + ".prequant.onnx")
    try:
        onnx.save(
            proto, str(plain), save_as_external_data=external, location=plain.name + ".data" if external else None
        )
        del proto
        for stale in (dst, dst.with_name(dst.name + ".data")):
            stale.unlink(missing_ok=True)
        with quiet_exporter():
            quantize_dynamic(
                str(plain),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                use_external_data_format=external,
            )
    finally:
        plain.unlink(missing_ok=True)
        plain.with_name(plain.name + ".data").unlink(missing_ok=True)
    log.info("quantized %s -> %s in %.1f s", src, dst, time.perf_counter() - t0)
    return dst


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with every graph optimization on."""
    ort = require_onnx()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(
    sess: Any, video: torch.Tensor | np.ndarray, telemetry: torch.Tensor | np.ndarray
) -> dict[str, np.ndarray]:
    """Logits of an ONNX session for one batch, keyed like the model's forward."""
    names = [i.name for i in sess.get_inputs()]
    feeds = {
        names[0]: np.ascontiguousarray(np.asarray(video)),
        names[1]: np.ascontiguousarray(np.asarray(telemetry, dtype=np.float32)),
    }
    if feeds[names[0]].dtype == np.float64:
        feeds[names[0]] = feeds[names[0]].astype(np.float32)
    return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), feeds), strict=True))


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Max abs logit difference and predicted-label agreement per head (plus the confidence logit)."""
    out: dict[str, Any] = {"max_abs_logit_diff": {}, "label_agreement": {}}
    for name in OUTPUTS:
        a, b = np.asarray(reference[name], dtype=np.float64), np.asarray(other[name], dtype=np.float64)
        out["max_abs_logit_diff"][name.removesuffix("_logits")] = float(np.abs(a - b).max()) if a.size else None
    for head in L.HEADS:
        a, b = reference[f"{head}_logits"].argmax(-1), other[f"{head}_logits"].argmax(-1)
        out["label_agreement"][head] = float((a == b).mean()) if a.size else None
    high_a = np.asarray(reference["confidence_logits"]) > 0
    high_b = np.asarray(other["confidence_logits"]) > 0
    out["label_agreement"]["confidence"] = float((high_a == high_b).mean()) if high_a.size else None
    out["max_abs_logit_diff_all"] = max(v for v in out["max_abs_logit_diff"].values() if v is not None)
    out["num_samples"] = int(reference["risk_logits"].shape[0])
    return out


@torch.inference_mode()
def torch_logits(
    model: SimV0Model, loader: Any, limit: int
) -> tuple[dict[str, np.ndarray], list[tuple[torch.Tensor, torch.Tensor]]]:
    """PyTorch logits (in the model's precision) over the first `limit` samples of a loader, and the
    inputs they came from."""
    key = model_key(model)
    outs: dict[str, list[np.ndarray]] = {n: [] for n in OUTPUTS}
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen = 0
    for batch in loader:
        take = min(limit - seen, batch["telemetry"].shape[0])
        video, tel = batch[key][:take], batch["telemetry"][:take].float()
        logits = model({key: video, "telemetry": tel})
        for n in OUTPUTS:
            outs[n].append(logits[n].float().numpy())
        inputs.append((video, tel))
        seen += take
        if seen >= limit:
            break
    return {n: np.concatenate(v) for n, v in outs.items()}, inputs


@torch.inference_mode()
def logits_of(model: SimV0Model, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    """PyTorch logits of `model` on the inputs `torch_logits` kept."""
    key = model_key(model)
    parts = [model({key: v, "telemetry": t}) for v, t in inputs]
    return {n: np.concatenate([p[n].float().numpy() for p in parts]) for n in OUTPUTS}


def onnx_logits(sess: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    parts = [run_session(sess, v.numpy(), t.numpy()) for v, t in inputs]
    return {n: np.concatenate([p[n] for p in parts]) for n in OUTPUTS}


def load_for_export(cfg: DictConfig) -> tuple[SimV0Model, Any, Path]:
    """(model, loader over the parity split, checkpoint path) for this command's config."""
    path = Path(str(cfg.checkpoint))
    ckpt = load_checkpoint(path)
    check_llm_override(cfg.get("llm"), ckpt["metadata"]["llm"], path)
    dataset = split_for_checkpoint(cfg, ckpt["metadata"], str(cfg.split), path)
    model = SimV0Model.from_checkpoint(path).eval()
    loader = split_loader(cfg.data, dataset, batch_size=min(64, max(2, int(cfg.parity_samples))))
    return model, loader, path


def export_and_check(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint `cfg` names to `cfg.out` and compare ONNX Runtime with PyTorch on its split.

    Args:
        cfg: conf/export_onnx.yaml composed (checkpoint, out, data, split, quantize, parity_samples, ...).

    Returns:
        The parity report: max abs logit difference and label agreement against eager fp32 (what the
        graph computes) and against the checkpoint's own precision; the same for int8 with quantize=true.

    Raises:
        ConfigError: checkpoint or out not given. OnnxRuntimeMissing: the optional extra is not installed.
    """
    require(cfg, "checkpoint", "path/to/best.pt")
    require(cfg, "out", "path/to/model.onnx")
    require_onnx()
    samples, threads = int(cfg.parity_samples), int(cfg.threads)
    model, loader, path = load_for_export(cfg)
    # The decisions the checkpoint was validated with: eager, in its own precision.
    trained_in = model.precision
    validated, inputs = torch_logits(model, loader, samples)
    # The graph computes in fp32; its conversion is checked against eager fp32 on the same weights.
    model.set_precision(named_precision("fp32"))
    ref = logits_of(model, inputs)
    out = export_model(
        model,
        str(cfg.out),
        example_inputs(model, {model_key(model): inputs[0][0], "telemetry": inputs[0][1]}),
        opset=int(cfg.opset) if cfg.opset else None,
    )
    onnx_out = onnx_logits(session(out, threads), inputs)
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "onnx": str(out),
        "split": str(cfg.split),
        "checkpoint_precision": trained_in.to_dict(),
        "fp32": compare(ref, onnx_out),
        "vs_checkpoint_precision": compare(validated, onnx_out),
    }
    if cfg.quantize:
        q = quantize_int8(out, out.with_name(out.stem + ".int8.onnx"))
        report["int8_onnx"] = str(q)
        int8_out = onnx_logits(session(q, threads), inputs)
        report["int8"] = compare(ref, int8_out)
        report["int8_vs_checkpoint_precision"] = compare(validated, int8_out)
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export_onnx")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        report = export_and_check(cfg)
    print(json.dumps(report, indent=2))
    if cfg.report:
        Path(str(cfg.report)).write_text(json.dumps(report, indent=2) + "\n")
    diff = report["fp32"]["max_abs_logit_diff_all"]
    if diff is not None and diff > float(cfg.max_abs_diff):
        print(
            f"error: ONNX Runtime logits differ from PyTorch fp32 by up to {diff:.3g} "
            f"(> max_abs_diff={cfg.max_abs_diff})",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
