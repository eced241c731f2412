"""A user-style custom dataset (as in the README's "Custom dataset"), used by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sim.data.dataset import SimDataset


class NpzRoverDataset(SimDataset):
    """Reads a split directory eagerly into memory and yields the sample dicts of the contract."""

    def __init__(self, data_path: str, use_cached_vis_feats: bool = True):
        super().__init__(data_path, use_cached_vis_feats)
        root = Path(data_path)
        self.vis = np.load(root / "vis_feats.npy")
        self.tel = np.load(root / "telemetry.npy")
        self.labels = {k: np.load(root / f"{k}_id.npy") for k in ("risk", "reason", "action")}
        self.ids = json.loads((root / "sample_id.json").read_text())

    def __len__(self):
        return len(self.vis)

    def __getitem__(self, idx):
        return {
            "vis_feats": torch.tensor(self.vis[idx]),
            "telemetry": torch.tensor(self.tel[idx]),
            "risk_id": int(self.labels["risk"][idx]),
            "reason_id": int(self.labels["reason"][idx]),
            "action_id": int(self.labels["action"][idx]),
            "sample_id": self.ids[idx],
        }
