"""llm.packed_weights: GPT-2's frozen linear layers with weights packed once for oneDNN compute exactly
what the library's layers compute, forward and backward, and follow changes to their weights; Llama's
nn.Linear layers keep PyTorch's kernel."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import TINY_ARCHS, same_bf16, tiny_llm

from sim.models.packed import has_packed_layers, pack_linears, packed_conv1d_class, packing_available

needs_packing = pytest.mark.skipif(not packing_available(), reason="oneDNN computes no bf16 on this CPU")


def llm(arch: str, packed: bool, dtype: str = "bfloat16"):
    return tiny_llm(arch, dtype, packed_weights=packed)


def forward_backward(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(inputs_embeds=x).last_hidden_state
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad


def packed_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "_packed" in m.__dict__]


@needs_packing
def test_packed_layers_compute_the_same_bits_forward_and_backward():
    """GPT-2's Conv1D, bf16: outputs and input gradients bit for bit (on AMX), plain and under CPU autocast."""
    plain, packed = llm("gpt2", packed=False), llm("gpt2", packed=True)
    x = torch.randn(8, 6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    y0, g0 = forward_backward(plain, x)
    y1, g1 = forward_backward(packed, x)
    assert packed_layers(packed), "the packed kernels did not run"
    assert same_bf16(y0, y1)
    assert same_bf16(g0, g1)
    # The same under CPU autocast, as SimV0Model calls the LLM.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, g0 = forward_backward(plain, x)
        y1, g1 = forward_backward(packed, x)
    assert same_bf16(y0, y1) and same_bf16(g0, g1)


def test_llama_layers_keep_pytorchs_kernel():
    model = llm("llama", packed=True)
    assert not has_packed_layers(model)
    assert model.sim_spec["packed_weights"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_packing_changes_no_parameter_names_and_fp32_runs_the_library_layer(arch):
    plain, packed = llm(arch, packed=False, dtype="float32"), llm(arch, packed=True, dtype="float32")
    assert plain.state_dict().keys() == packed.state_dict().keys()
    assert packed.sim_spec["packed_weights"] and not plain.sim_spec["packed_weights"]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    y0, g0 = forward_backward(plain, x)
    y1, g1 = forward_backward(packed, x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert not packed_layers(packed), "fp32 must not pack"


def gpt2_layer(trainable: bool = False) -> torch.nn.Module:
    layer = packed_conv1d_class()(32, 64).to(torch.bfloat16)  # Conv1D(nf=32 outputs, nx=64 inputs)
    return layer.requires_grad_(trainable)


def library(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.addmm(layer.bias, x, layer.weight)  # what transformers' Conv1D computes


@needs_packing
def test_a_changed_or_replaced_weight_is_repacked():
    layer = gpt2_layer()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    layer(x)
    assert packed_layers(torch.nn.Sequential(layer))
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves
    assert same_bf16(layer(x), library(layer, x))
    layer.load_state_dict({"weight": torch.randn(64, 32), "bias": torch.zeros(32)})
    assert same_bf16(layer(x), library(layer, x))
    layer.float().bfloat16()  # new tensors
    assert same_bf16(layer(x), library(layer, x))


@needs_packing
def test_a_trainable_weight_takes_the_library_path_and_gets_its_gradient():
    layer = gpt2_layer(trainable=True)
    layer(torch.randn(4, 64, dtype=torch.bfloat16)).sum().backward()
    assert layer.weight.grad is not None and "_packed" not in layer.__dict__


def test_pack_linears_swaps_gpt2_layers_only():
    model = llm("gpt2", packed=False, dtype="float32")
    assert pack_linears(model) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 layers
    assert has_packed_layers(model)


@needs_packing
def test_a_packed_llm_copies_and_pickles_without_its_packed_weights():
    model = llm("gpt2", packed=True)
    x = torch.randn(2, 6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(inputs_embeds=x).last_hidden_state
    assert packed_layers(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not packed_layers(clone)
        with torch.no_grad():
            assert torch.equal(clone(inputs_embeds=x).last_hidden_state, y)
