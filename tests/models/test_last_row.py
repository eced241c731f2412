"""llm.skip_unread_rows: the last layer computes only the query token's row, and SIM's logits and
gradients are bit for bit those of the full last layer; the LLM called on its own computes every row."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, same_bf16, tiny_llm

from sim.models.last_row import last_row_only
from sim.models.llm import build_llm
from sim.models.model import SimV0Model

# bf16: bit for bit where verified (`same_bf16`). fp32 (MKL): a one-row matmul may round the last bit
# differently from the same row inside a six-row one, so there the check is fp32's own tolerance.
CASES = [("gpt2", "float32"), ("gpt2", "bfloat16"), ("llama", "float32"), ("llama", "bfloat16")]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.bfloat16:
        return same_bf16(a, b)
    torch.testing.assert_close(a, b)
    return True


def llm(arch: str, dtype: str, skip: bool):
    return tiny_llm(arch, dtype, packed_weights=True, skip_unread_rows=skip)


def model(arch: str, dtype: str, skip: bool, **variant) -> SimV0Model:
    torch.manual_seed(0)
    return SimV0Model(llm=llm(arch, dtype, skip), dv=16, F=4, K=2, variant=variant or None)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"vis_feats": torch.randn(8, 4, 16, generator=g), "telemetry": torch.randn(8, 8, generator=g)}


def logits_and_grads(m: SimV0Model) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    out = m(batch())
    sum(v.float().sum() * (i + 1) for i, v in enumerate(out.values())).backward()
    return {k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in m.trainable_parameters()]


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_the_skipped_rows_change_no_logit_and_no_gradient(arch, dtype):
    full, skipping = model(arch, dtype, skip=False), model(arch, dtype, skip=True)
    assert skipping.reads_last_row_only() and full.reads_last_row_only()
    rows: dict[str, int] = {}

    def count_rows(name: str):
        def hook(module, args, out) -> None:
            rows[name] = args[0].shape[1]

        return hook

    for name, m in (("full", full), ("skipping", skipping)):
        (m.llm.h if arch == "gpt2" else m.llm.layers)[-1].mlp.register_forward_hook(count_rows(name))
    a, ga = logits_and_grads(full)
    b, gb = logits_and_grads(skipping)
    assert rows == {"full": 4, "skipping": 1}  # K=2 visual tokens, telemetry, query: the MLP ran on Q only
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    assert len(ga) == len(gb) and all(same(x, y) for x, y in zip(ga, gb, strict=True))


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_the_last_layer_skips_rows_only_inside_the_models_forward(arch):
    skipping = llm(arch, "bfloat16", skip=True)
    full = llm(arch, "bfloat16", skip=False)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    with torch.no_grad():
        every_row = full(inputs_embeds=x).last_hidden_state
        assert torch.equal(skipping(inputs_embeds=x).last_hidden_state, every_row)  # hooks off: every row
        with last_row_only(skipping) as active:
            assert active
            y = skipping(inputs_embeds=x).last_hidden_state
        assert torch.equal(skipping(inputs_embeds=x).last_hidden_state, every_row)  # and off again
    assert same(y[:, -1], every_row[:, -1])
    assert not torch.allclose(y[:, :-1], every_row[:, :-1])  # the other rows were not computed


def test_readouts_of_several_rows_compute_every_row():
    m = model("gpt2", "float32", skip=True, readout="queries", num_queries=3)
    assert not m.reads_last_row_only()
    reference = model("gpt2", "float32", skip=False, readout="queries", num_queries=3)
    a, b = m(batch()), reference(batch())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_architecture_without_the_hooks_computes_every_row():
    opt = build_llm(
        name_or_path="tiny-opt",
        pretrained=False,
        dtype="float32",
        arch={
            "model_type": "opt",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "hidden_size": 64,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "vocab_size": 16,
        },
        skip_unread_rows=True,
    )
    with last_row_only(opt) as active:
        assert not active
