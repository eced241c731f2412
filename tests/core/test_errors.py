"""Clear errors: each names what was wrong, and the command exits 1 with one `error:` line, no traceback.

The traceback of an error raised after start-up is kept in the run's logs/stdout.log instead.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg, run_cmd
from test_bad_input import DV, F, cached, good_sample, small_split, tiny_model

from sim.core.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from sim.core.errors import ConfigError, DataError, LLMLoadError
from sim.core.run import run_log
from sim.data.dataset import CachedSplitDataset
from sim.models.llm import build_llm
from sim.models.model import SimV0Model, segment_mean_matrix
from sim.training.train import train


def test_k_greater_than_f_is_refused_by_the_command(tmp_path):
    res = run_cmd("train.py", *TINY, "model.F=4", "model.K=5", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1
    assert "model.K=5 > model.F=4" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "checkpoints").exists(), "nothing should be written for a config that cannot work"


def test_segments_are_as_even_as_possible():
    P = segment_mean_matrix(8, 3)
    sizes = (P > 0).sum(1).tolist()
    assert sorted(sizes) == [2, 3, 3] and torch_allclose_rows(P)
    assert (P > 0).sum(0).tolist() == [1] * 8  # every frame in exactly one segment
    with pytest.raises(ConfigError, match=r"model\.K=5"):
        segment_mean_matrix(4, 5)


def torch_allclose_rows(P) -> bool:
    return bool(((P.sum(1) - 1).abs() < 1e-6).all())


def test_typed_d_that_disagrees_with_the_llm(tmp_path):
    with pytest.raises(ConfigError, match=r"model.d=768 .* width 128"):
        train(make_cfg(*TINY, "model.d=768"), run_dir=tmp_path)


def test_typed_dv_that_disagrees_with_the_data(tmp_path):
    with pytest.raises(ConfigError, match=r"model.dv=768 .* 64 wide"):
        train(make_cfg(*TINY, "model.dv=768"), run_dir=tmp_path)


def test_data_f_that_disagrees_with_model_f(tmp_path, synthetic_split):
    with pytest.raises(ConfigError, match=r"F=8 frames per sample but model\.F=4"):
        train(
            make_cfg(
                *TINY,
                "model.F=4",
                "data=cached",
                f"data.train_split_path={synthetic_split}/train",
                f"data.val_split_path={synthetic_split}/val",
            ),
            run_dir=tmp_path,
        )


def test_label_out_of_range_names_file_and_sample(tmp_path, synthetic_split):
    import shutil

    split = tmp_path / "bad"
    shutil.copytree(synthetic_split / "train", split)
    labels = np.load(split / "action_id.npy")
    labels[17] = 6
    np.save(split / "action_id.npy", labels)
    with pytest.raises(DataError, match=r"action_id.npy: label 6 at sample 17 is out of range 0..5"):
        CachedSplitDataset(split)


def test_missing_split_directory_is_named(tmp_path):
    res = run_cmd(
        "train.py",
        *TINY,
        "data=cached",
        f"data.train_split_path={tmp_path}/nope",
        f"data.val_split_path={tmp_path}/nope",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert res.returncode == 1
    assert f"split directory not found: {tmp_path}/nope" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") or "\nerror:" in res.stderr


def test_meta_json_that_disagrees_is_refused(tmp_path, synthetic_split):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(synthetic_split / "val", split)
    meta = json.loads((split / "meta.json").read_text())
    (split / "meta.json").write_text(json.dumps({**meta, "dv": 768}))
    with pytest.raises(DataError, match=r"dv is 32, meta\.json says 768"):
        CachedSplitDataset(split)


def test_llm_that_cannot_be_loaded_says_how_to_run_offline():
    with pytest.raises(LLMLoadError, match=r"llm\.pretrained=false") as info:
        build_llm("gpt2", pretrained=True)
    assert "smollm2_135m_gguf" in str(info.value)
    with pytest.raises(LLMLoadError, match="not installed"):
        build_llm(gguf_file="x.gguf", gguf_package="no_such_package_here")


def test_raw_frames_without_an_encoder_is_refused():
    with pytest.raises(ConfigError, match="need a vision encoder"):
        SimV0Model(
            llm={
                "arch": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 8},
                "pretrained": False,
                "dtype": "float32",
            },
            dv=16,
            use_cached_vis_feats=False,
        )


def test_feature_data_with_a_frames_encoder_is_refused_cleanly(tmp_path):
    res = run_cmd("train.py", *TINY, "vision=tiny", "data=synthetic", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1 and "error: vision=tiny encodes raw frames" in res.stderr
    assert "Traceback" not in res.stderr


# ---- errors after start-up: one line on screen, the traceback in logs/stdout.log --------------------
def _nan_telemetry(root):
    split = small_split(root)
    tel = np.load(split / "train" / "telemetry.npy")
    tel[3, 6] = np.nan
    np.save(split / "train" / "telemetry.npy", tel)
    return [*cached(split), "data.on_bad_sample=error"]


def _data_of_other_f(root):
    return [*cached(small_split(root)), "model.F=4", "model.K=2"]


def _resume_with_other_k(root):
    split = small_split(root / "data")
    last = root / "before" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    # The metadata of a K=2 run on this data and LLM: K is the one thing that differs.
    meta = {"format": CHECKPOINT_FORMAT, "dv": DV, "d": make_cfg(*TINY).llm.arch.n_embd, "F": F, "K": 2, "llm": {}}
    save_checkpoint(last, {"model_state_dict": {}, "metadata": meta, "epoch": 1})
    return [*cached(split), f"training.resume={last.parent.parent}", "model.K=4"]


def _unfinished_cache(root):
    split = small_split(root)
    (split / "val" / "meta.json").unlink()
    (split / "val" / "cache_progress.json").write_text(json.dumps({"rows_done": 8}))
    return cached(split)


AFTER_START_UP = {
    "offline-hub-id": (lambda root: ["llm=gpt2"], "could not load LLM 'gpt2'"),
    "model.d": (
        lambda root: ["model.d=7", "data.train_kwargs.num_samples=32", "data.val_kwargs.num_samples=16"],
        "model.d=7 but the LLM tiny-gpt2",
    ),
    "data-f": (_data_of_other_f, "F=8 frames per sample but model.F=4"),
    "nan-sample": (
        _nan_telemetry,
        "sample 3 (sample_id 'synth-train-0-000003'): telemetry has 1 non-finite value (nan)",
    ),
    "resume-other-k": (_resume_with_other_k, "K is 2 there, 4 in this config"),
    "unfinished-cache": (_unfinished_cache, "is an unfinished feature cache"),
}


@pytest.mark.parametrize("case", list(AFTER_START_UP))
def test_an_error_after_start_up_is_one_line_on_screen_and_a_traceback_in_the_log(tmp_path, case):
    overrides, message = AFTER_START_UP[case]
    llm = [] if case == "offline-hub-id" else ["llm=tiny"]
    run_dir = tmp_path / "run"
    res = run_cmd(
        "train.py",
        *llm,
        "training.progress_bar=false",
        "data.batch_size=16",
        *overrides(tmp_path),
        f"hydra.run.dir={run_dir}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    log = (run_dir / "logs" / "stdout.log").read_text()
    logged, traceback = log.split("training failed: ", 1)[1].split("\nTraceback (most recent call last):\n", 1)
    assert message in logged and "sim.core.errors." in traceback
    # Some messages go on to a second line (what to do about it): still the one error, nothing else.
    assert res.stderr == f"error: {logged}\n"
    assert "Traceback" not in res.stdout


def test_run_log_shows_a_traceback_on_the_console_only_for_errors_that_are_not_sims(tmp_path):
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    logging.getLogger().addHandler(handler)
    log = logging.getLogger("sim.evaluation.evaluate")
    try:
        with pytest.raises(DataError), run_log(tmp_path / "a.log", log, "evaluation failed"):
            raise DataError("sample 3: telemetry is missing")
        assert console.getvalue() == ""
        with pytest.raises(ZeroDivisionError), run_log(tmp_path / "b.log", log, "evaluation failed"):
            raise ZeroDivisionError("division by zero")
        assert "Traceback" in console.getvalue() and "ZeroDivisionError" in console.getvalue()
    finally:
        logging.getLogger().removeHandler(handler)
    first = (tmp_path / "a.log").read_text()
    assert "evaluation failed: sample 3: telemetry is missing" in first and "Traceback" in first
    assert "Traceback" in (tmp_path / "b.log").read_text()


@pytest.mark.parametrize(
    "sweeper", [[], ["hydra/sweeper=sim_optuna", "hydra.sweeper.n_trials=2"]], ids=["basic", "sim_optuna"]
)
def test_a_sweep_whose_trials_all_fail_ends_in_one_error_line(tmp_path, sweeper):
    sweep_dir = tmp_path / "sweep"
    k = "model.K=choice(1,2)" if sweeper else "model.K=1,2"
    res = run_cmd(
        "train.py",
        "-m",
        *sweeper,
        *TINY,
        "model.d=7",
        k,
        "data.train_kwargs.num_samples=32",
        "data.val_kwargs.num_samples=16",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "all 2 trials failed; the first, trial 0 (" in last, res.stderr
    assert "with ConfigError: model.d=7 but the LLM tiny-gpt2" in last
    assert f"(its log: {sweep_dir / '0' / 'logs' / 'stdout.log'})" in last
    assert "Traceback" not in res.stdout + res.stderr
    assert "Traceback (most recent call last)" in (sweep_dir / "0" / "logs" / "stdout.log").read_text()


def test_predict_json_takes_numpy_arrays_and_lists_as_well_as_tensors():
    model = tiny_model()
    samples = [good_sample(i) for i in range(3)]
    batch = {
        "vis_feats": torch.stack([s["vis_feats"] for s in samples]),
        "telemetry": torch.stack([s["telemetry"] for s in samples]),
        "sample_id": [s["sample_id"] for s in samples],
    }
    expected = model.predict_json(batch)
    as_numpy = {**batch, "vis_feats": batch["vis_feats"].numpy(), "telemetry": batch["telemetry"].double().numpy()}
    assert model.predict_json(as_numpy) == expected
    assert model.predict_json({**batch, "telemetry": batch["telemetry"].tolist()}) == expected
    with pytest.raises(DataError, match=r"batch\['telemetry'\] is list .*expected a tensor, a NumPy array"):
        model.predict_json({**batch, "telemetry": [["fast"] * 8] * 3})
    with pytest.raises(DataError, match=r"batch\['vis_feats'\] has dtype torch.bool"):
        model.predict_json({**batch, "vis_feats": np.zeros((3, F, DV), dtype=bool)})


def test_the_split_must_fit_the_model_with_the_fix_named():
    from sim.core.shapes import check_split_matches_model, split_mismatches

    assert split_mismatches([8, 64], F=8, dv=64, use_cached=True) == []
    assert split_mismatches([8, 3, 32, 32], F=8, use_cached=False) == []
    with pytest.raises(ConfigError, match=r"the train split has F=8 frames per sample but model.F=4; set model.F=8"):
        check_split_matches_model([8, 64], F=4, use_cached=True, what="the train split")
    with pytest.raises(DataError, match=r"features 32 wide but checkpoint c.pt reads \[F=8, dv=64\]"):
        check_split_matches_model([8, 32], F=8, dv=64, use_cached=True, checkpoint="c.pt")
    (kind,) = split_mismatches([8, 3, 32, 32], F=4, dv=64, use_cached=True)
    assert "vision=cached reads features [F, dv]" in kind and "pick an encoder" in kind
    (kind,) = split_mismatches([8, 64], F=8, use_cached=False)
    assert "use vision=cached" in kind
