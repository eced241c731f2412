"""The fast path's decisions (not its timings: those are the benchmark's job, python -m sim bench)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cmd

from sim.commands.bench import llm_flops_per_token
from sim.core import precision
from sim.data.dataset import CachedSplitDataset


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.resolve_dtype("auto", "cpu") == torch.float32  # emulated bf16 would be far slower
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("float16", "cpu") == torch.float16  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown dtype"):
        precision.resolve_dtype("float8", "cpu")


def test_llm_flops_count_matmul_weights_not_embeddings():
    from transformers import GPT2Config, GPT2Model

    llm = GPT2Model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=1000))
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # qkv, proj, fc, fc-proj weights
    assert llm_flops_per_token(llm, tokens=6) == 2 * 2 * per_layer + 2 * 2 * 2 * 6 * 32


def test_cached_split_reads_rows_lazily(synthetic_split):
    ds = CachedSplitDataset(synthetic_split / "train")
    assert isinstance(ds.video, np.memmap), "features must stay memory-mapped, never loaded whole"
    batch = ds.__getitems__([5, 1, 3])
    assert torch.equal(batch["vis_feats"][0], ds[5]["vis_feats"]) and batch["sample_id"][1] == ds[1]["sample_id"]


def test_bench_prints_the_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = run_cmd(
        "-m",
        "sim",
        "bench",
        "llm=tiny",
        "data=dummy",
        "data.dataset_kwargs.dv=32",
        "data.train_kwargs.num_samples=64",
        "data.val_kwargs.num_samples=32",
        "data.batch_size=16",
        "steps=2",
        "warmup=1",
        "reference=true",
        "peer=1",
        "profile=3",
        f"json={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train samples/s" in res.stdout and "MFU" in res.stdout and "speed-up vs naive" in res.stdout
    result = json.loads(out.read_text())
    assert result["train"]["samples_per_s"] > 0 and 0 < result["mfu"] < 1
    # The same step against the peak of its own matmul shapes: a second, positive yardstick.
    assert "matmul peak, step's shapes" in res.stdout
    assert result["shape_peak_gflops"] > 0 and result["mfu_of_shape_peak"] > 0
    assert set(result["train"]["phase_ms_per_step"]) == {"data", "forward", "backward", "optimizer"}
    # The Lightning peer ran the same model and batches, and the profile names where the time went.
    assert "speed-up vs Lightning" in res.stdout
    assert result["peer"]["lightning_samples_per_s"][0] > 0 and result["peer"]["speedup_vs_lightning"] > 0
    ops, kinds = result["profile"]["ops"], result["profile"]["kinds"]
    assert len(ops) == 3 and all(0 < op["share"] <= 1 for op in ops)
    assert kinds["matmuls"] > 0 and abs(sum(kinds.values()) - 1) < 1e-6 and "time in matmuls" in res.stdout
    assert result["matmul_gflops_in_step"] > 0
