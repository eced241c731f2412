"""`training.compile=auto`: on only where the compile is repaid; a compiled run trains as the eager one."""

from __future__ import annotations

import json

import pytest
import torch

from sim.core.errors import ConfigError
from sim.training.compiling import MIN_PARAMS, resolve_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BIG = 2 * MIN_PARAMS


def choose(setting="auto", device=CPU, params=BIG, steps=5000, min_steps=1000, debug=None, cpp=True, packed=False):
    return resolve_compile(
        setting,
        device=device,
        llm_params=params,
        planned_steps=steps,
        min_steps=min_steps,
        debug_mode=debug,
        cpp_compiler=cpp,
        packed_weights=packed,
    )


@pytest.mark.parametrize(
    ("kwargs", "enabled", "why"),
    [
        ({}, True, "5000 optimizer steps"),
        ({"steps": 256}, False, "256 optimizer steps < training.compile_min_steps=1000"),
        ({"params": 400_000}, False, "small LLM"),
        ({"debug": "anomaly"}, False, "debug=anomaly"),
        ({"cpp": False}, False, "no C++ compiler"),
        ({"packed": True}, False, "packed weights"),
        ({"packed": True, "setting": True}, True, "training.compile=true"),
        ({"device": CUDA, "steps": 10}, True, "CUDA"),
        ({"setting": True, "params": 10}, True, "training.compile=true"),
        ({"setting": False}, False, "training.compile=false"),
    ],
)
def test_auto_compiles_only_where_it_pays(kwargs, enabled, why):
    choice = choose(**kwargs)
    assert choice.enabled is enabled
    assert why in choice.reason


def test_only_a_bf16_llm_on_a_cpu_with_onednn_bf16_computes_packed():
    from sim.models.llm import build_llm
    from sim.models.packed import packing_available
    from sim.training.compiling import computes_packed

    arch = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 16, "vocab_size": 16}
    build = lambda dtype, packed: build_llm(  # noqa: E731
        name_or_path="tiny", pretrained=False, dtype=dtype, arch=arch, packed_weights=packed
    )
    assert computes_packed(build("bfloat16", True), CPU) is packing_available()
    assert not computes_packed(build("bfloat16", False), CPU)
    assert not computes_packed(build("float32", True), CPU)


def test_an_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match=r"training.compile='sometimes': expected true, false or auto"):
        choose("sometimes")


def test_a_compiled_run_trains_as_the_eager_one(tmp_path):
    """What compile=auto switches on changes kernels, not results: the same losses within fp32 tolerance."""
    from conftest import TINY, make_cfg

    from sim.training.train import train

    small = (*TINY, "llm.dtype=float32", "training.amp=false", "training.epochs=1")
    small += ("data.train_kwargs.num_samples=256", "data.val_kwargs.num_samples=64")
    runs = {}
    for compiled in ("false", "true"):
        run_dir = tmp_path / compiled
        train(make_cfg(*small, f"training.compile={compiled}"), run_dir=run_dir)
        runs[compiled] = json.loads((run_dir / "metrics" / "val_metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "loss_risk", "loss_reason", "loss_action"):
        assert runs["true"][key] == pytest.approx(runs["false"][key], rel=1e-4, abs=1e-5), key
