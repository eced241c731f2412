"""`python -m sim.export checkpoint=... out=DIR`: the portable directory round-trips, its card tells the truth."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cmd

from sim.core.errors import CheckpointError
from sim.models.model import SimV0Model
from sim.models.pretrained import WEIGHTS_FILE


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run_dir, _, _ = tiny_run
    out = tmp_path_factory.mktemp("artifact")
    best = run_dir / "checkpoints" / "best.pt"
    res = run_cmd("-m", "sim.export", f"checkpoint={best}", f"out={out}", "parity_samples=64")
    assert res.returncode == 0, res.stderr[-3000:]
    return best, out


def val_batch(model: SimV0Model, n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    video = torch.randn(n, model.F, model.dv, generator=g)
    return {"vis_feats": video, "telemetry": torch.randn(n, 8, generator=g) * 3}


def test_the_directory_holds_what_the_contract_lists(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "onnx_parity.json",
        "README.md",
        "sim_v0_infer.py",
    } <= names
    config = json.loads((out / "config.json").read_text())
    for key in ("dv", "d", "F", "K", "llm", "vision", "precision", "labels", "telemetry_mean", "risk_high_threshold"):
        assert key in config, key
    parity = json.loads((out / "onnx_parity.json").read_text())
    assert parity["fp32"]["max_abs_logit_diff_all"] < 1e-3


def test_from_pretrained_decides_as_from_checkpoint(exported):
    best, out = exported
    a, b = SimV0Model.from_checkpoint(best), SimV0Model.from_pretrained(out)
    assert a.precision == b.precision
    batch = val_batch(a)
    with torch.no_grad():
        la, lb = a(batch), b(batch)
    assert la.keys() == lb.keys()
    for name in la:
        assert torch.equal(la[name], lb[name]), name
    assert a.predict_json(batch) == b.predict_json(batch)
    # The precision override works as it does for a checkpoint.
    assert SimV0Model.from_pretrained(out, precision="fp32").precision.name == "fp32"
    # One loader under both names: each takes a checkpoint file or an exported directory.
    c, d = SimV0Model.from_checkpoint(out), SimV0Model.from_pretrained(best)
    with torch.no_grad():
        lc, ld = c(batch), d(batch)
    assert all(torch.equal(lc[k], la[k]) and torch.equal(ld[k], la[k]) for k in la)


def test_model_card_figures_are_evaluate_py_figures(exported, tmp_path):
    best, out = exported
    res = run_cmd("evaluate.py", f"checkpoint={best}", f"hydra.run.dir={tmp_path}", "progress_bar=false")
    assert res.returncode == 0, res.stderr[-3000:]
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| ([-\d.na/]+) \|$", card, flags=re.M))
    for name in ("action_accuracy", "risk_high_recall", "macro_f1", "loss"):
        assert float(rows[name]) == pytest.approx(evaluated[name], abs=5e-5), name
    config = json.loads((out / "config.json").read_text())
    assert config["risk_high_threshold"] == evaluated["risk_high_threshold"]
    assert f"{evaluated['risk_high_threshold']:.4f}" in card
    for section in ("## Intended use and limits", "## Training", "## Safety threshold", "## How to load"):
        assert section in card


def test_a_damaged_directory_is_refused_by_name(exported, tmp_path):
    _, out = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in out.iterdir():
        if p.is_file():
            (broken / p.name).write_bytes(p.read_bytes())
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        SimV0Model.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="not an exported SIM model"):
        SimV0Model.from_pretrained(tmp_path)


def test_the_wrapper_inside_the_directory_loads_the_files_beside_it(exported, tmp_path):
    """`python DIR/sim_v0_infer.py window.npz` run from elsewhere: the directory's model, decided with the
    directory's calibrated threshold."""
    import numpy as np

    _, out = exported
    model = SimV0Model.from_pretrained(out)
    batch = val_batch(model, n=1)
    window = tmp_path / "window.npz"
    np.savez(window, telemetry=batch["telemetry"][0].numpy(), vis_feats=batch["vis_feats"][0].numpy())
    res = run_cmd(str(out / "sim_v0_infer.py"), str(window), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    threshold = json.loads((out / "config.json").read_text())["risk_high_threshold"]
    want = model.predict_json({**batch, "sample_id": ["window"]}, risk_high_threshold=threshold)[0]
    assert json.loads(res.stdout) == want  # the wrapper names a window by its file
