"""The last layer computed only where it is read (`llm.skip_unread_rows`).

SIM's v0 heads read one hidden state: the LLM's output at the query token Q, the last of the prefix.
Every layer but the last must still run on all rows (their keys and values feed the later layers'
attention), but in the last one only Q's row reaches the heads: its attention output projection, the
norm before the MLP and the MLP run on that row alone. Two forward pre-hooks do it, on the last layer's
output projection and on its pre-MLP norm; the block's residual additions then broadcast the one
row over the others, so the last layer's output is exact in the last row and meaningless elsewhere.
`SimV0Model.forward` therefore switches the hooks on (`last_row_only`) only around its own LLM call and
reads the last row only. For the architectures in `LAST_LAYER`, the row and its gradients are bit for
bit those of the full layer in bf16 on AMX CPUs, and equal within the precision's rounding elsewhere
(a one-row matmul may round the last bit differently from the same row inside a six-row one); both
tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

# model_type -> (the list of decoder layers, the last layer's attention output projection, its pre-MLP
# norm, its MLP): the blocks whose forward is `h + attn(norm1(h))`, then `h + mlp(norm2(h))`.
LAST_LAYER = {
    "gpt2": ("h", "attn.c_proj", "ln_2", "mlp"),
    "llama": ("layers", "self_attn.o_proj", "post_attention_layernorm", "mlp"),
}
FLAG = "sim_last_row_only"


def _last_layer(llm: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    names = LAST_LAYER.get(getattr(getattr(llm, "config", None), "model_type", ""))
    layers = getattr(llm, names[0], None) if names else None
    if not names or not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    return layers[-1], names[1:]


def _keep_last_row(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    owner = module.__dict__.get("_sim_owner")
    if owner is None or not owner.__dict__.get(FLAG, False):
        return None
    # Copied, not a strided view: the matmuls and norms that follow run a strided row measurably slower.
    return (args[0][:, -1:].contiguous(), *args[1:])


def install(llm: nn.Module) -> bool:
    """Put the two pre-hooks on `llm`'s last layer (inactive until `last_row_only`). False for an
    architecture not in `LAST_LAYER`, which then always computes every row."""
    found = _last_layer(llm)
    if found is None:
        return False
    last, (proj, norm, _) = found
    for name in (proj, norm):
        module = last.get_submodule(name)
        module.__dict__["_sim_owner"] = llm  # a plain reference, not a submodule
        module.register_forward_pre_hook(_keep_last_row)
    llm.__dict__[FLAG] = False
    return True


def installed(llm: nn.Module) -> bool:
    return FLAG in llm.__dict__


@contextmanager
def last_row_only(llm: nn.Module, on: bool = True) -> Iterator[bool]:
    """Within the block, `llm`'s last layer computes its last row only (when `on` and installed).
    Yields whether it does: then only `last_hidden_state[:, -1]` is meaningful."""
    active = on and installed(llm)
    previous = llm.__dict__.get(FLAG, False)
    if active:
        llm.__dict__[FLAG] = True
    try:
        yield active
    finally:
        if active:
            llm.__dict__[FLAG] = previous


def last_row_weights(llm: nn.Module) -> int:
    """How many matmul weights of the last layer run on the last row only (the attention output
    projection and the MLP's): per sample, 2 x this x (rows - 1) FLOPs each way are not computed."""
    found = _last_layer(llm)
    if found is None or not installed(llm):
        return 0
    last, (proj, _, mlp) = found
    modules = [last.get_submodule(proj), last.get_submodule(mlp)]
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)
