"""A run's precision is decided once, recorded in its checkpoints, and used by everything that reads them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cmd

from sim.core import precision as P
from sim.core.checkpoint import load_checkpoint
from sim.core.errors import ConfigError
from sim.core.precision import Precision, named_precision, resolve_precision
from sim.models.model import SimV0Model
from sim.models.serialization import checkpoint_precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: native)
    auto = resolve_precision("auto", "auto", "bfloat16", "cpu")
    want = torch.bfloat16 if native else torch.float32
    assert auto.weights == want and auto.autocast == (torch.bfloat16 if native else None)
    # Forced values do not depend on the machine.
    assert resolve_precision("float32", False, "bfloat16", "cpu") == Precision(torch.float32, None)
    assert resolve_precision("bfloat16", True, "bfloat16", "cpu") == Precision(torch.bfloat16, torch.bfloat16)


def test_precision_rules_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match=r"training\.amp_dtype=float16 needs CUDA"):
        resolve_precision("float32", True, "float16", "cpu")
    with pytest.raises(ConfigError, match=r"training\.amp='maybe'"):
        resolve_precision("float32", "maybe", "bfloat16", "cpu")
    with pytest.raises(ConfigError, match=r"llm\.dtype"):
        resolve_precision("int4", False, "bfloat16", "cpu")
    with pytest.raises(ConfigError, match="precision='fp8'"):
        named_precision("fp8")


def test_precision_survives_a_checkpoint_round_trip():
    for p in (
        Precision(torch.float32, None),
        Precision(torch.float32, torch.bfloat16),
        Precision(torch.bfloat16, torch.bfloat16),
    ):
        assert Precision.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_checkpoints_record_the_precision_they_were_trained_in(precision_run):
    run_dir, _, cfg = precision_run
    meta = load_checkpoint(run_dir / "checkpoints" / "best.pt")["metadata"]
    want = named_precision("bf16" if cfg.training.amp else "fp32")
    assert checkpoint_precision(meta) == want
    assert meta["llm"]["dtype"] == P.dtype_name(want.weights)  # the resolved dtype, never "auto"
    model = SimV0Model.from_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert model.precision == want and model.llm_dtype == want.weights


def test_the_state_dict_carries_the_precision(tiny_runs):
    """Seed 000's loading code builds the model in fp32 and loads the state dict: it must then compute
    as the checkpoint did, and an fp32 checkpoint must not turn into bf16 or the other way round."""
    bf16 = torch.load(tiny_runs("bf16")[0] / "checkpoints" / "best.pt", weights_only=True)
    fp32 = torch.load(tiny_runs("fp32")[0] / "checkpoints" / "best.pt", weights_only=True)
    model = SimV0Model.from_metadata(fp32["metadata"])
    assert model.precision == named_precision("fp32")
    model.load_state_dict(bf16["model_state_dict"])
    assert model.precision == named_precision("bf16") and model.llm_dtype == torch.bfloat16
    model.load_state_dict(fp32["model_state_dict"])
    assert model.precision == named_precision("fp32") and model.llm_dtype == torch.float32


def test_an_explicit_precision_overrides_the_checkpoints_and_is_reported(tiny_runs, tmp_path):
    run_dir = tiny_runs("bf16")[0]
    best = run_dir / "checkpoints" / "best.pt"
    model = SimV0Model.from_checkpoint(best, precision="fp32")
    assert model.precision == named_precision("fp32") and model.llm_dtype == torch.float32
    res = run_cmd(
        "evaluate.py", f"checkpoint={best}", "precision=fp32", f"hydra.run.dir={tmp_path}", "progress_bar=false"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["evaluation"]["precision"] == {"weights": "float32", "autocast": None}
    assert report["evaluation"]["precision_source"] == "override"
    assert "not the bf16 the checkpoint was trained and validated in" in (tmp_path / "evaluate.log").read_text()
