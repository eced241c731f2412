"""Clear errors at start-up: each names what was wrong, and the command exits 1 without a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, make_cfg, run_cmd
from sim.dataset import CachedSplitDataset
from sim.errors import ConfigError, DataError, LLMLoadError
from sim.llm import build_llm
from sim.model import SimV0Model, segment_mean_matrix
from sim.train import train


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
    with pytest.raises(ConfigError, match="model.K=5"):
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
    with pytest.raises(ConfigError, match="F=8 frames per sample but model.F=4"):
        train(make_cfg(*TINY, "model.F=4", "data=cached", f"data.train_split_path={synthetic_split}/train",
                       f"data.val_split_path={synthetic_split}/val"), run_dir=tmp_path)


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
    res = run_cmd("train.py", *TINY, "data=cached", f"data.train_split_path={tmp_path}/nope",
                  f"data.val_split_path={tmp_path}/nope", f"hydra.run.dir={tmp_path}/run")
    assert res.returncode == 1
    assert f"split directory not found: {tmp_path}/nope" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") or "\nerror:" in res.stderr


def test_meta_json_that_disagrees_is_refused(tmp_path, synthetic_split):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(synthetic_split / "val", split)
    meta = json.loads((split / "meta.json").read_text())
    (split / "meta.json").write_text(json.dumps({**meta, "dv": 768}))
    with pytest.raises(DataError, match="dv is 32, meta.json says 768"):
        CachedSplitDataset(split)


def test_llm_that_cannot_be_loaded_says_how_to_run_offline():
    with pytest.raises(LLMLoadError, match="llm.pretrained=false") as info:
        build_llm("gpt2", pretrained=True)
    assert "smollm2_135m_gguf" in str(info.value)
    with pytest.raises(LLMLoadError, match="not installed"):
        build_llm(gguf_file="x.gguf", gguf_package="no_such_package_here")


def test_llm_load_error_from_the_command(tmp_path):
    res = run_cmd("train.py", "llm=gpt2", "training.progress_bar=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1
    assert "could not load LLM 'gpt2'" in res.stderr and "Traceback" not in res.stderr


def test_raw_frames_without_an_encoder_is_refused():
    with pytest.raises(ConfigError, match="need a vision encoder"):
        SimV0Model(llm={"arch": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 8},
                        "pretrained": False, "dtype": "float32"}, dv=16, use_cached_vis_feats=False)


def test_feature_data_with_a_frames_encoder_is_refused_cleanly(tmp_path):
    res = run_cmd("train.py", *TINY, "vision=tiny", "data=synthetic", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1 and "error: vision=tiny encodes raw frames" in res.stderr
    assert "Traceback" not in res.stderr
