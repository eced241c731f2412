"""`from sim.model import SimV0Model`: the import path seed 000 shows its users (the code lives in
`sim.models.model`)."""

from sim.models.model import SimV0Model

__all__ = ["SimV0Model"]
