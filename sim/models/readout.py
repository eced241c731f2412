"""Readout (`model.readout`): which LLM output states the heads read.

- `last_token` (v0): one learned query token Q ends the prefix [V_1..V_K, T, Q]; every head reads
  the LLM's last hidden state at Q.
- `queries`: `model.num_queries` learned query tokens end the prefix and are read out at their
  positions. `model.query_heads=pooled` averages their states into one state every head reads;
  `per_head` gives each head its own query (risk, reason, action; the confidence head reads the
  action query's state, as it judges the action), so there are as many queries as heads.

The tokens are the model's `query` parameter: [d] for last_token (as v0 stores it), [Q, d] otherwise.
"""

from __future__ import annotations

import torch

from sim.core import labels as L
from sim.core.errors import ConfigError

READOUTS = ("last_token", "queries")
QUERY_HEADS = ("pooled", "per_head")


def num_query_tokens(readout: str, num_queries: int, query_heads: str) -> int:
    """How many query tokens end the prefix.

    Raises:
        ConfigError: an unknown readout or query_heads, or a num_queries that cannot work.
    """
    if readout == "last_token":
        return 1
    if readout != "queries":
        raise ConfigError(f"model.readout={readout!r}: expected one of {', '.join(READOUTS)}")
    if query_heads not in QUERY_HEADS:
        raise ConfigError(f"model.query_heads={query_heads!r}: expected one of {', '.join(QUERY_HEADS)}")
    if query_heads == "per_head":  # one query per head, whatever num_queries says
        return len(L.HEADS)
    if num_queries is None or int(num_queries) < 1:
        raise ConfigError(f"model.num_queries={num_queries}: expected at least 1 query token")
    return int(num_queries)


def init_query(n: int, d: int) -> torch.Tensor:
    """Initial query tokens: [d] for one (v0's shape and values, from the same random stream), else [n, d]."""
    if n == 1:
        return torch.randn(d) * 0.02
    return torch.randn(n, d) * 0.02


def head_states(last_hidden: torch.Tensor, n: int, query_heads: str) -> dict[str, torch.Tensor]:
    """{head: the state it reads [B, d]} from the LLM's last hidden states [B, T, d] (the queries last)."""
    if n == 1:
        h = last_hidden[:, -1]
        return dict.fromkeys((*L.HEADS, "confidence"), h)
    states = last_hidden[:, -n:]
    if query_heads == "pooled":
        return dict.fromkeys((*L.HEADS, "confidence"), states.mean(dim=1))
    per_head = {head: states[:, i] for i, head in enumerate(L.HEADS)}
    return {**per_head, "confidence": per_head["action"]}
