"""From a checkpoint to the rover: the run's inference wrapper, the seed README's loading example, ONNX
export with its parity report, and the latency benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cmd

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint
from sim.core.cli import compose
from sim.core.errors import ConfigError, DataError
from sim.evaluation.evaluate import split_for_checkpoint, split_loader
from sim.models.model import SimV0Model


@pytest.fixture(scope="module")
def trained(precision_run):
    """(best.pt, the model rebuilt from it, the first val batch evaluate.py would read), each precision."""
    best = precision_run[0] / "checkpoints" / "best.pt"
    cfg = compose("evaluate", [f"checkpoint={best}"])
    dataset = split_for_checkpoint(cfg, load_checkpoint(best)["metadata"], "val", best)
    batch = next(iter(split_loader(cfg.data, dataset, batch_size=8)))
    return best, SimV0Model.from_checkpoint(best), batch


def one_window(batch: dict, i: int) -> dict:
    return {
        "vis_feats": batch["vis_feats"][i : i + 1],
        "telemetry": batch["telemetry"][i : i + 1],
        "sample_id": [batch["sample_id"][i]],
    }


def load_wrapper(run_dir: Path):
    spec = importlib.util.spec_from_file_location("sim_v0_infer", run_dir / "export" / "sim_v0_infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wrapper_script_prints_what_predict_json_returns(precision_run, trained, tmp_path):
    _best, model, batch = trained
    window = tmp_path / "window.npz"
    np.savez(
        window,
        telemetry=batch["telemetry"][0].numpy(),
        vis_feats=batch["vis_feats"][0].numpy(),
        sample_id=np.array(batch["sample_id"][0]),
    )
    # Run from elsewhere: the wrapper finds ../checkpoints/best.pt from its own location.
    res = run_cmd(str(precision_run[0] / "export" / "sim_v0_infer.py"), str(window), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == model.predict_json(one_window(batch, 0))[0]


def test_wrapper_imports_applies_the_threshold_and_takes_batches(precision_run, trained, tmp_path):
    best, model, batch = trained
    wrapper = load_wrapper(precision_run[0])
    # A metrics.json of evaluate.py is accepted as the threshold's source.
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"risk_high_threshold": 0.05}))
    infer = wrapper.SimInference(risk_high_threshold=metrics)
    assert infer.checkpoint.resolve() == best.resolve() and infer.risk_high_threshold == 0.05
    single = infer(
        batch["telemetry"][1].numpy(), vis_feats=batch["vis_feats"][1].numpy(), sample_id=batch["sample_id"][1]
    )
    assert single == model.predict_json(one_window(batch, 1), risk_high_threshold=0.05)[0]
    many = infer(
        batch["telemetry"].numpy(),
        vis_feats=batch["vis_feats"].numpy().astype(np.float16),
        sample_id=list(batch["sample_id"]),
    )
    expected = model.predict_json({**batch, "vis_feats": batch["vis_feats"].half().float()}, risk_high_threshold=0.05)
    assert many == expected
    # A low threshold turns more decisions to "high", never fewer.
    plain = model.predict_json(batch)
    assert sum(d["risk"]["label"] == "high" for d in many) >= sum(d["risk"]["label"] == "high" for d in plain)


def test_wrapper_refuses_bad_windows_by_name(precision_run, trained, tmp_path):
    _, _model, batch = trained
    infer = load_wrapper(precision_run[0]).SimInference()
    with pytest.raises(DataError, match=r"vis_feats has shape \[8, 32\], expected \[F=8, dv=64\]"):
        infer(batch["telemetry"][0].numpy(), vis_feats=np.zeros((8, 32), np.float32))
    with pytest.raises(DataError, match=r"telemetry has shape \[7\]"):
        infer(np.zeros(7, np.float32), vis_feats=batch["vis_feats"][0].numpy())
    with pytest.raises(DataError, match="NaN or inf"):
        infer(np.full(8, np.nan, np.float32), vis_feats=batch["vis_feats"][0].numpy())
    with pytest.raises(DataError, match="reads vis_feats"):
        infer(batch["telemetry"][0].numpy(), frames=np.zeros((8, 3, 4, 4), np.uint8))
    no_tel = tmp_path / "no_tel.npz"
    np.savez(no_tel, vis_feats=batch["vis_feats"][0].numpy())
    with pytest.raises(DataError, match=rf"{no_tel.name} has no 'telemetry'"):
        infer.predict_npz(no_tel)


def test_wrapper_main_on_a_foreign_checkpoint_says_so(precision_run, trained, tmp_path, capsys):
    _, _, batch = trained
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    window = tmp_path / "w.npz"
    np.savez(window, telemetry=batch["telemetry"][0].numpy(), vis_feats=batch["vis_feats"][0].numpy())
    assert load_wrapper(precision_run[0]).main([str(window), "--checkpoint", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert f"error: {foreign} is not a SIM checkpoint" in err and "Traceback" not in err


def test_seed_readme_loading_example_works_as_written_with_a_local_llm(trained, tmp_path):
    """The seed README's "Loading Checkpoints" code, with a local directory as the LLM id (offline)."""
    best, reference, batch = trained
    from sim.models.llm import build_llm

    meta = load_checkpoint(best)["metadata"]
    local_llm = tmp_path / "llm"
    build_llm(**meta["llm"]).save_pretrained(local_llm)

    checkpoint = torch.load(best)
    model = SimV0Model(
        llm_name_or_path=str(local_llm),
        dv=meta["dv"],
        d=meta["d"],
        F=8,
        K=4,
        use_cached_vis_feats=True,
    )
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    predictions = model.predict_json(batch)
    assert predictions == reference.predict_json(batch)
    assert [p["sample_id"] for p in predictions] == batch["sample_id"]
    assert all(p["risk"]["label"] in L.RISK for p in predictions)


def test_onnx_export_matches_pytorch(precision_run, trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    best, _model, batch = trained
    from sim.export.onnx import export_and_check

    out = tmp_path / "sim.onnx"
    report = export_and_check(
        compose("export_onnx", [f"checkpoint={best}", f"out={out}", "quantize=true", "parity_samples=256"])
    )
    assert report["fp32"]["num_samples"] == 256
    assert report["fp32"]["max_abs_logit_diff_all"] < 1e-4
    assert all(v == 1.0 for v in report["fp32"]["label_agreement"].values())
    # int8 weights: a smaller file whose decisions are reported, not assumed.
    assert Path(report["int8_onnx"]).stat().st_size < out.stat().st_size
    assert all(0.0 <= v <= 1.0 for v in report["int8"]["label_agreement"].values())

    # The batch dimension is dynamic: an odd batch size the export never saw.
    from sim.export.onnx import run_session, session

    logits = run_session(session(out), batch["vis_feats"][:3].numpy(), batch["telemetry"][:3].numpy())
    fp32 = SimV0Model.from_checkpoint(best, precision="fp32")  # the graph computes in fp32
    with torch.inference_mode():
        ref = fp32({"vis_feats": batch["vis_feats"][:3], "telemetry": batch["telemetry"][:3]})
    for name, value in logits.items():
        assert value.shape == tuple(ref[name].shape)
        np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-4)


def test_latency_benchmark_times_eager_backends(trained):
    from sim.export.latency import bench, format_table

    best, _, _ = trained
    backends = "backends=[eager_fp32,eager_bf16,onnx_fp32,onnx_int8_pc]"
    report = bench(compose("bench_latency", [f"checkpoint={best}", backends, "windows=8", "warmup=1"]))
    assert set(report["backends"]) == {"eager_fp32", "eager_bf16", "onnx_fp32", "onnx_int8_pc"}
    assert report["windows"] == 8
    # Every backend is also compared with eager fp32; the fp32 graph decides as eager fp32 does, and
    # per-channel int8 weights take about a quarter of the fp32 bytes.
    onnx, int8 = report["backends"]["onnx_fp32"], report["backends"]["onnx_int8_pc"]
    assert onnx["label_agreement_vs_fp32"] == {"risk": 1.0, "reason": 1.0, "action": 1.0, "confidence": 1.0}
    assert set(int8["label_agreement_vs_fp32"]) == {"risk", "reason", "action", "confidence"}
    assert int8["weights_mb"] < onnx["weights_mb"] / 2
    fp32, bf16 = report["backends"]["eager_fp32"], report["backends"]["eager_bf16"]
    assert fp32["ms_median"] > 0 and bf16["ms_median"] > 0
    assert fp32["label_agreement"] == {"risk": 1.0, "reason": 1.0, "action": 1.0, "confidence": 1.0}
    assert bf16["weights_mb"] == pytest.approx(fp32["weights_mb"] / 2, rel=0.01)
    table = format_table(report)
    assert "eager_bf16" in table and "ms median" in table


def test_export_and_bench_commands_name_what_is_missing(tmp_path):
    from sim.export.latency import bench
    from sim.export.onnx import export_and_check

    with pytest.raises(ConfigError, match="checkpoint must be set"):
        export_and_check(compose("export_onnx", [f"out={tmp_path / 'x.onnx'}"]))
    with pytest.raises(ConfigError, match="out must be set"):
        export_and_check(compose("export_onnx", [f"checkpoint={tmp_path / 'missing.pt'}"]))
    with pytest.raises(ConfigError, match="give checkpoint=PATH, or llm=NAME"):
        bench(compose("bench_latency", ["windows=2"]))
    with pytest.raises(ConfigError, match=r"unknown \['eager_fp64'\]"):
        bench(compose("bench_latency", ["llm=tiny", "backends=eager_fp64"]))
    # As users type it: a one-line error and exit status 1, and the plain comma list of backends.
    res = run_cmd("-m", "sim", "bench_latency", "llm=tiny", "backends=eager_fp32,eager_fp64")
    assert res.returncode == 1 and res.stderr.strip() == (
        "error: backends: unknown ['eager_fp64']; expected some of "
        "eager_fp32, eager_bf16, onnx_fp32, onnx_int8, onnx_int8_pc"
    )
