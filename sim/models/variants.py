"""The model options beside v0 (`model.pooling`, `model.readout`, `model.loss_weighting`,
`model.adaptation`), as one checked value a checkpoint stores and rebuilds from.

Each option has its own module and builder (pooling.py, readout.py, loss_weighting.py, lora.py);
`ModelVariant()` is v0, and a model built with it computes bit for bit as v0 did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sim.core.errors import ConfigError
from sim.models.lora import lora_spec
from sim.models.loss_weighting import LOSS_WEIGHTINGS
from sim.models.pooling import POOLINGS
from sim.models.readout import num_query_tokens

KEYS = ("pooling", "readout", "num_queries", "query_heads", "loss_weighting", "adaptation", "lora")


@dataclass(frozen=True)
class ModelVariant:
    pooling: str = "segment_mean"
    readout: str = "last_token"
    num_queries: int = 4  # readout=queries, query_heads=pooled
    query_heads: str = "pooled"
    loss_weighting: str = "fixed"
    lora: dict[str, Any] | None = None  # None: a frozen LLM (adaptation=frozen)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ModelVariant:
        """From the `model` config node (or a checkpoint's `variant`), the keys absent taking v0's values.

        Raises:
            ConfigError: an unknown option name or value.
        """
        options = dict(options or {})
        adaptation = options.get("adaptation", "lora" if options.get("lora") else "frozen")
        variant = cls(
            pooling=str(options.get("pooling", "segment_mean")),
            readout=str(options.get("readout", "last_token")),
            num_queries=int(options.get("num_queries", 4)),
            query_heads=str(options.get("query_heads", "pooled")),
            loss_weighting=str(options.get("loss_weighting", "fixed")),
            lora=lora_spec(str(adaptation), options.get("lora")),
        )
        if variant.pooling not in POOLINGS:
            raise ConfigError(f"model.pooling={variant.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if variant.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(
                f"model.loss_weighting={variant.loss_weighting!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}"
            )
        num_query_tokens(variant.readout, variant.num_queries, variant.query_heads)
        return variant

    @property
    def n_queries(self) -> int:
        """Query tokens at the end of the prefix."""
        return num_query_tokens(self.readout, self.num_queries, self.query_heads)

    @property
    def adaptation(self) -> str:
        return "frozen" if self.lora is None else "lora"

    def is_v0(self) -> bool:
        return self == ModelVariant()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "adaptation": self.adaptation}

    def describe(self) -> str:
        parts = [f"pooling={self.pooling}", f"readout={self.readout}"]
        if self.readout == "queries":
            parts.append(f"{self.n_queries} queries ({self.query_heads})")
        parts += [f"loss_weighting={self.loss_weighting}", f"adaptation={self.adaptation}"]
        if self.lora:
            parts.append(f"lora r={self.lora['r']} alpha={self.lora['alpha']}")
        return ", ".join(parts)
