"""Loss weighting (`model.loss_weighting`): how the heads' losses add up to the training objective.

- `fixed` (v0): the configured `model.loss_weights`, w_risk*L_risk + w_reason*L_reason + w_action*L_action.
- `learned`: homoscedastic-uncertainty weights (Kendall, Gal & Cipolla, 2018): a learned s_h per head
  and the objective sum_h exp(-s_h) * L_h + s_h, so a head whose loss stays high is weighed down and
  the s_h term keeps the weights from collapsing to zero. s_h starts at -log(w_h): training starts from
  the configured weights. The weights exp(-s_h) are logged with the training metrics.

The confidence head's weight stays the configured one in both: it reads a detached state and judges
the action, it is not a task to balance. The reported `loss` is always the fixed-weight sum, so runs
with either weighting compare on the same number; only the objective the optimizer minimizes differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from sim.core import labels as L
from sim.core.errors import ConfigError

LOSS_WEIGHTINGS = ("fixed", "learned")


class LearnedLossWeights(nn.Module):
    """One learned log-variance s_h per head (see the module doc)."""

    def __init__(self, initial: Mapping[str, float]) -> None:
        super().__init__()
        bad = {h: initial.get(h) for h in L.HEADS if not float(initial.get(h, 0.0)) > 0}
        if bad:
            raise ConfigError(f"model.loss_weighting=learned starts from model.loss_weights, which must be > 0: {bad}")
        self.log_vars = nn.Parameter(torch.tensor([-math.log(float(initial[h])) for h in L.HEADS]))

    def combine(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted objective of the heads' losses {head: L_h}."""
        s = self.log_vars.float()
        terms = [torch.exp(-s[i]) * parts[h] + s[i] for i, h in enumerate(L.HEADS)]
        return torch.stack(terms).sum()

    def weights(self) -> dict[str, float]:
        """The current weight exp(-s_h) of each head (what the training metrics log)."""
        return {h: float(torch.exp(-v)) for h, v in zip(L.HEADS, self.log_vars.detach().float(), strict=True)}


def build_loss_weighting(name: str, loss_weights: Mapping[str, float]) -> LearnedLossWeights | None:
    """None for `fixed` (the weights are plain numbers), the learned module for `learned`.

    Raises:
        ConfigError: an unknown name.
    """
    if name == "fixed":
        return None
    if name == "learned":
        return LearnedLossWeights(loss_weights)
    raise ConfigError(f"model.loss_weighting={name!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
