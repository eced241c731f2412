"""Temporal pooling (`model.pooling`): F per-frame features [B,F,dv] -> K visual tokens [B,K,dv].

- `segment_mean` (v0): token k is the mean of the k-th of K contiguous, near-equal segments of the F
  frames. No parameters.
- `attention`: K learned queries attend over the F frames (one multi-head attention layer, with a
  learned position per frame), so a token can weigh the frames that matter instead of averaging a
  fixed segment. Any K <= F works, a K that does not divide F included.

`build_pooling(name, F, K, dv)` selects one by name; `POOLINGS` lists the names.
"""

from __future__ import annotations

import torch
from torch import nn

from sim.core.errors import ConfigError


def segment_mean_matrix(F: int, K: int) -> torch.Tensor:
    """[K, F] matrix whose rows average K contiguous, near-equal segments of F frames.

    Segment k covers frames [floor(k*F/K), floor((k+1)*F/K)); sizes differ by at most one.
    """
    if not 1 <= K <= F:
        raise ConfigError(f"model.K={K} must be between 1 and model.F={F} (K visual tokens are averaged from F frames)")
    P = torch.zeros(K, F)
    for k in range(K):
        lo, hi = k * F // K, (k + 1) * F // K
        P[k, lo:hi] = 1.0 / (hi - lo)
    return P


class SegmentMean(nn.Module):
    """v0's pooling: a fixed [K, F] averaging matrix (a non-persistent buffer: nothing to store)."""

    matrix: torch.Tensor

    def __init__(self, F: int, K: int) -> None:
        super().__init__()
        self.register_buffer("matrix", segment_mean_matrix(F, K), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kf,bfd->bkd", self.matrix.to(feats.dtype), feats)


class AttentionPooling(nn.Module):
    """K learned queries attend over the F frame features (plus a learned position per frame).

    Starts close to a segment mean: each query's attention is initialized flat and the output adds
    the segment mean of its frames, so training begins where v0 does and learns to re-weight.
    """

    def __init__(self, F: int, K: int, dv: int, num_heads: int = 4) -> None:
        super().__init__()
        heads = num_heads if dv % num_heads == 0 else 1
        self.register_buffer("segments", segment_mean_matrix(F, K), persistent=False)
        self.queries = nn.Parameter(torch.zeros(K, dv))
        self.position = nn.Parameter(torch.zeros(F, dv))
        self.norm = nn.LayerNorm(dv)
        self.attn = nn.MultiheadAttention(dv, heads, batch_first=True)
        # The attended part starts at zero: the first forward passes are the segment mean.
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    segments: torch.Tensor

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        keys = self.norm(feats + self.position.to(feats.dtype))
        q = self.queries.to(feats.dtype).expand(feats.shape[0], -1, -1)
        attended, _ = self.attn(q, keys, keys, need_weights=False)
        return torch.einsum("kf,bfd->bkd", self.segments.to(feats.dtype), feats) + attended


POOLINGS = ("segment_mean", "attention")


def build_pooling(name: str, F: int, K: int, dv: int) -> nn.Module:
    """The pooling `model.pooling` names.

    Raises:
        ConfigError: an unknown name, or K outside 1..F.
    """
    if name == "segment_mean":
        return SegmentMean(F, K)
    if name == "attention":
        segment_mean_matrix(F, K)  # the same K <= F rule, with the same message
        return AttentionPooling(F, K, dv)
    raise ConfigError(f"model.pooling={name!r}: expected one of {', '.join(POOLINGS)}")
