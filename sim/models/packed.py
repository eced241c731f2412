"""GPT-2's frozen matmul weights packed once for oneDNN (`llm.packed_weights`).

On CPU, every bf16 matmul PyTorch runs through oneDNN first reorders its weight into the blocked
layout the AMX / AVX512 kernels read. For a trained layer that is unavoidable, as the weight changes
every step; SIM's LLM is frozen, so `pack_linears` makes its GPT-2 layers (transformers' Conv1D) keep
two packed copies: the weight for the forward pass, and its transpose for the gradient of the input
(the only gradient a frozen layer passes back; frozen weights get none). The same function; on AMX
CPUs the same bits too (tested on the tiny architecture, and measured at gpt2's widths). On a CPU
with AMX, `sim bench llm=gpt2 llm.pretrained=false data=dummy data.batch_size=64 profile=1` prints
about a sixth less time in matmuls (84-94 ms a step against 102-109 unpacked).

Llama-style `nn.Linear` layers are left to PyTorch's own kernel: at SmolLM2's shapes oneDNN's packed
kernel is a slower one, and rounds differently (`sim bench`, SmolLM2, batch 64: 129-131 samples/s packed
against 143-159 unpacked).

The layers keep their parameters, so state dicts, `.to()`, peft's LoRA (which wraps them) and
checkpoints see the modules they know. They pack lazily, on the first call that can use the packed
kernels, and again whenever the weight is replaced or changed in place. Everything else (fp32,
CUDA, a trainable weight, ONNX export, tracing, torch.compile) runs the layer's own forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


@functools.cache
def packing_available() -> bool:
    """oneDNN is built in and computes bf16 on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    # `rows`: the expected number of input rows, from which oneDNN picks the layout; later calls may have other counts.
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W frozen: the backward computes the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, layer: PackedMixin):
        ctx.layer = layer
        return _packed_linear(x, packed, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        packed_t = ctx.layer.packed_weights(grad.shape[0], transposed=True)
        return _packed_linear(grad.contiguous(), packed_t, None), None, None, None


class PackedMixin(nn.Module):
    """The packed path of a frozen GPT-2 layer (transformers' Conv1D: weight [in, out], y = x W + b)."""

    weight: torch.Tensor

    def bias_or_none(self) -> torch.Tensor | None:
        return getattr(self, "bias", None)

    def packed_weights(self, rows: int, transposed: bool = False) -> torch.Tensor:
        """The packed weight as oneDNN's linear reads it ([out, in]), or for the input's gradient
        ([in, out], the stored layout), repacked when the weight was replaced (`.to()`, a load with
        assign) or changed in place (`copy_`)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, transposed)
        cache: dict[bool, tuple[Any, torch.Tensor]] = self.__dict__.setdefault("_packed", {})
        hit = cache.get(transposed)
        if hit is None or hit[0] != key:
            cache[transposed] = (key, _pack(w if transposed else w.t(), rows))
            hit = cache[transposed]
        return hit[1]

    def takes_packed_path(self, x: torch.Tensor) -> bool:
        """True when this call computes in bf16 on CPU (bf16 weights, and a bf16 input or CPU autocast
        to bf16) and the packed kernels may run; otherwise the layer's own forward runs."""
        # Compiling or exporting first: those see the library's layer, and never trace the checks below.
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False
        w, b = self.weight, self.bias_or_none()
        if (
            x.device.type != "cpu"
            or w.dtype != torch.bfloat16
            or w.requires_grad
            or (b is not None and (b.requires_grad or b.dtype != torch.bfloat16))
            or x.numel() == 0
            or not packing_available()
            or torch.onnx.is_in_onnx_export()
        ):
            return False
        if x.dtype == torch.bfloat16:
            return True
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        packed = self.packed_weights(rows.shape[0])
        if torch.is_grad_enabled() and rows.requires_grad:
            out = _FrozenLinear.apply(rows, packed, self.bias_or_none(), self)
        else:
            out = _packed_linear(rows, packed, self.bias_or_none())
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __getstate__(self) -> dict[str, Any]:
        # The packed copies are oneDNN's opaque tensors: rebuilt where needed, never copied or pickled.
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}


def _conv1d_class() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@functools.cache
def packed_conv1d_class() -> type[nn.Module]:
    """transformers' Conv1D (GPT-2's linear layer, weight [in, out]) with the packed path."""
    Conv1D = _conv1d_class()

    class PackedConv1D(PackedMixin, Conv1D):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.takes_packed_path(x):
                return Conv1D.forward(self, x)
            return self.packed_forward(x)

    # Found by pickle as sim.models.packed.PackedConv1D (the module's __getattr__ below).
    PackedConv1D.__module__, PackedConv1D.__qualname__ = __name__, "PackedConv1D"
    return PackedConv1D


def __getattr__(name: str) -> Any:
    # transformers is imported only when GPT-2's layer class is asked for, not with this module.
    if name == "PackedConv1D":
        return packed_conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pack_linears(model: nn.Module) -> int:
    """Give every GPT-2 linear layer (transformers' Conv1D) of the frozen `model` the packed path, in
    place: the same modules and parameters, a subclass that packs its weight on first use.
    Returns the number of layers changed."""
    Conv1D = _conv1d_class()
    swapped = 0
    for module in model.modules():
        if type(module) is Conv1D:
            module.__class__ = packed_conv1d_class()
            swapped += 1
    return swapped


def has_packed_layers(model: nn.Module) -> bool:
    return any(isinstance(m, PackedMixin) for m in model.modules())
