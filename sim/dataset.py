"""`from sim.dataset import SimDataset`: the import path seed 000 shows its users (the code lives in
`sim.data.dataset`)."""

from sim.data.dataset import CachedSplitDataset, SimData, SimDataset

__all__ = ["CachedSplitDataset", "SimData", "SimDataset"]
