"""optim=adamw: torch's fused AdamW where it exists (CPU, CUDA), the same update as its per-tensor loop."""

from __future__ import annotations

import torch

from sim.training.optim import adamw


def test_adamw_is_fused_on_cpu_and_updates_as_the_loop_does():
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(33, 17)), torch.nn.Parameter(torch.randn(5))]  # noqa: E731
    fused_params, loop_params = make(), make()
    for a, b in zip(fused_params, loop_params, strict=True):
        b.data.copy_(a.data)
    fused, _ = adamw(fused_params, total_steps=10, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    start = [p.detach().clone() for p in fused_params]
    for step in range(5):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(step)) for p in fused_params]
        for opt, params in ((fused, fused_params), (loop, loop_params)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b, s in zip(fused_params, loop_params, start, strict=True):
        assert not torch.equal(a, s)  # it trained
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adamw_over_no_parameter_on_a_fused_device_keeps_the_loop():
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    opt, _ = adamw(meta, total_steps=1)
    assert not opt.defaults["fused"]
