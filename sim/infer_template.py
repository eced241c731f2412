#!/usr/bin/env python
"""Minimal SIM v0 inference wrapper, written into every run's export/ directory.

As a script:
    python sim_v0_infer.py window.npz [--checkpoint ../checkpoints/best.pt]
where window.npz holds `telemetry` [8] (raw, the model normalizes it) and either `vis_feats` [F, dv]
or `frames` [F, 3, H, W] (a leading batch dimension is accepted too). Prints the JSON decision.

Importable:
    from sim_v0_infer import SimInference
    decision = SimInference("checkpoints/best.pt")(telemetry=..., vis_feats=...)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sim.model import SimV0Model

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "best.pt"


class SimInference:
    """Loads a checkpoint once; each call turns one window (or a batch of windows) into decisions."""

    def __init__(self, checkpoint: str | Path = DEFAULT_CHECKPOINT, device: str = "cpu",
                 risk_high_threshold: float | None = None) -> None:
        self.model = SimV0Model.from_checkpoint(checkpoint, device=device)
        self.risk_high_threshold = risk_high_threshold

    def __call__(self, telemetry, vis_feats=None, frames=None, sample_id: str | None = None):
        video_key, video = ("vis_feats", vis_feats) if vis_feats is not None else ("frames", frames)
        if video is None:
            raise ValueError("give vis_feats [F, dv] or frames [F, 3, H, W]")
        video = torch.as_tensor(np.asarray(video))
        tel = torch.as_tensor(np.asarray(telemetry, dtype=np.float32))
        single = tel.dim() == 1
        if single:
            video, tel = video.unsqueeze(0), tel.unsqueeze(0)
        if video_key == "vis_feats":
            video = video.float()
        ids = [sample_id] * tel.shape[0] if sample_id is not None else None
        batch = {video_key: video, "telemetry": tel}
        if ids is not None:
            batch["sample_id"] = ids
        out = self.model.predict_json(batch, risk_high_threshold=self.risk_high_threshold)
        return out[0] if single else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("window", help=".npz with telemetry and vis_feats or frames")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--risk-high-threshold", type=float, default=None)
    args = parser.parse_args()
    data = np.load(args.window, allow_pickle=False)
    infer = SimInference(args.checkpoint, risk_high_threshold=args.risk_high_threshold)
    sample_id = str(data["sample_id"]) if "sample_id" in data else Path(args.window).stem
    result = infer(
        telemetry=data["telemetry"],
        vis_feats=data["vis_feats"] if "vis_feats" in data else None,
        frames=data["frames"] if "frames" in data else None,
        sample_id=sample_id,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
