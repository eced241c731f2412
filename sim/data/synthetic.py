"""Synthetic rover scenes whose labels follow rules a model can learn.

A scene has a hazard (its type is the reason label: human, obstacle, tight_space, unknown), a
proximity level, a side (left or right of the path) and a speed. The rules:

    risk   = none                       if the hazard is far
           = proximity level + 1        if the rover is fast, else the proximity level (capped at high)
    action = continue (risk none), slow (low), turn away from the hazard's side (medium),
             stop for a human or unknown hazard / reverse from an obstacle or tight space (high)

What the model sees: the hazard type, its side and its proximity only in the frame features (the
hazard's prototype grows over the window as the rover closes in: closer means bigger); the speed
only in the telemetry (`v`, with `ax` following it). So both branches are needed to predict risk
and action, and zeroing either one at evaluation costs accuracy.

Deterministic by seed. In memory: `data=synthetic`. On disk, in the cached-split format:

    python -m sim synthetic out=DIR [num_train=2048] [num_val=512] [F=8] [dv=64] [seed=0]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from sim.core import labels as L
from sim.core.cli import CONF_DIR, fail_cleanly, require
from sim.core.errors import ConfigError
from sim.data.dataset import TensorSplit

# Proximity bins with gaps between them, so every rule has a margin.
PROXIMITY_BINS = ((0.0, 0.15), (0.3, 0.45), (0.6, 0.75), (0.9, 1.05))
SLOW, FAST = (0.1, 0.5), (1.0, 1.8)
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}
WORLD_SEED = 1234  # prototypes are shared by every split and seed: the same world, other scenes


@dataclass
class Scenes:
    """Latent scene parameters and their labels, one entry per sample."""

    reason: np.ndarray  # [N] hazard type = reason id
    level: np.ndarray  # [N] proximity level 0..3
    proximity: np.ndarray  # [N] in [0, 1.05]
    side: np.ndarray  # [N] -1 left, +1 right
    fast: np.ndarray  # [N] bool
    speed: np.ndarray  # [N] m/s
    risk: np.ndarray
    action: np.ndarray


def rules(reason: np.ndarray, level: np.ndarray, side: np.ndarray, fast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk and action ids from the latent scene (the ground truth the model must learn)."""
    risk = np.where(level == 0, 0, np.minimum(level + fast.astype(np.int64), 3))
    action = np.full_like(risk, L.ACTION.index("continue"))
    action[risk == 1] = L.ACTION.index("slow")
    turn = np.where(side < 0, L.ACTION.index("turn_right"), L.ACTION.index("turn_left"))
    action[risk == 2] = turn[risk == 2]
    stop_for = np.isin(reason, [L.REASON.index("human"), L.REASON.index("unknown")])
    high_action = np.where(stop_for, L.ACTION.index("stop"), L.ACTION.index("reverse"))
    action[risk == 3] = high_action[risk == 3]
    return risk, action


def sample_scenes(n: int, rng: np.random.Generator) -> Scenes:
    reason = rng.integers(0, 4, n)
    level = rng.integers(0, 4, n)
    lo = np.array([b[0] for b in PROXIMITY_BINS])[level]
    hi = np.array([b[1] for b in PROXIMITY_BINS])[level]
    proximity = rng.uniform(lo, hi)
    side = rng.choice([-1, 1], n)
    fast = rng.random(n) < 0.5
    speed = np.where(fast, rng.uniform(*FAST, n), rng.uniform(*SLOW, n))
    risk, action = rules(reason, level, side, fast)
    return Scenes(reason, level, proximity, side, fast, speed, risk, action)


def telemetry_for(scenes: Scenes, rng: np.random.Generator) -> np.ndarray:
    """[N, 8] raw telemetry [ax, ay, az, gx, gy, gz, v, w]: speed is the signal, the rest is plausible noise."""
    n = scenes.speed.shape[0]
    w = rng.uniform(-0.5, 0.5, n)
    tel = np.stack(
        [
            0.3 * scenes.speed + rng.normal(0, 0.1, n),  # ax: throttle follows speed
            rng.normal(0, 0.2, n),  # ay
            9.81 + rng.normal(0, 0.05, n),  # az: gravity
            rng.normal(0, 0.05, n),  # gx
            rng.normal(0, 0.05, n),  # gy
            w + rng.normal(0, 0.02, n),  # gz: the yaw gyro reads the yaw rate
            scenes.speed,  # v
            w,  # w
        ],
        axis=1,
    )
    return tel.astype(np.float32)


def prototypes(dv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This world's directions in feature space: per hazard type [4, dv], terrain [dv], side [dv]."""
    world = np.random.default_rng(WORLD_SEED + dv)
    return world.normal(0, 1, (4, dv)), world.normal(0, 1, dv), world.normal(0, 1, dv)


def features_for(scenes: Scenes, F: int, dv: int, rng: np.random.Generator, noise: float = 1.0) -> np.ndarray:
    """[N, F, dv] frame features. Each frame mixes terrain and the hazard by the share of the view
    the hazard fills, which grows as the rover closes in (closer means bigger), plus its side."""
    protos, terrain, side_dir = prototypes(dv)
    n = scenes.reason.shape[0]
    ramp = 0.7 + 0.3 * (np.arange(F) / max(F - 1, 1))  # approaching over the window
    area = 0.1 + 0.8 * np.clip(scenes.proximity[:, None] * ramp[None, :], 0, 1)  # [N, F] share of the view
    feats = (1 - area)[..., None] * terrain[None, None, :] + area[..., None] * protos[scenes.reason][:, None, :]
    feats += (scenes.side[:, None] * area)[..., None] * side_dir[None, None, :]
    feats += rng.normal(0, noise, (n, F, dv))
    return feats.astype(np.float32)


def generate(
    num_samples: int, F: int = 8, dv: int = 64, seed: int = 0, split: str = "train", noise: float = 1.0
) -> dict[str, Any]:
    """All arrays of one split, keyed as in the cached-split format."""
    rng = np.random.default_rng(seed * 7919 + SPLIT_OFFSET.get(split, hash(split) % 1000))
    scenes = sample_scenes(int(num_samples), rng)
    return {
        "vis_feats": features_for(scenes, F, dv, rng, noise),
        "telemetry": telemetry_for(scenes, rng),
        "risk_id": scenes.risk.astype(np.int64),
        "reason_id": scenes.reason.astype(np.int64),
        "action_id": scenes.action.astype(np.int64),
        "sample_id": [f"synth-{split}-{seed}-{i:06d}" for i in range(int(num_samples))],
        "scenes": scenes,
    }


class SyntheticSimDataset(TensorSplit):
    """`data=synthetic`: rover scenes generated in memory (see the module docstring for the rules)."""

    def __init__(
        self,
        data_path: str | Path | None = None,
        use_cached_vis_feats: bool = True,
        num_samples: int = 2048,
        F: int = 8,
        dv: int = 64,
        seed: int = 0,
        split: str = "train",
        noise: float = 1.0,
    ) -> None:
        super().__init__(data_path, use_cached_vis_feats)
        if not use_cached_vis_feats:
            raise ConfigError(
                "data=synthetic yields features (vis_feats), but the vision option reads raw frames; "
                "use data=synthetic_frames with a vision encoder, or vision=cached with data=synthetic"
            )
        arrays = generate(num_samples, F, dv, seed, split, noise)
        self.set_tensors(
            torch.from_numpy(arrays["vis_feats"]),
            torch.from_numpy(arrays["telemetry"]),
            {h: torch.from_numpy(arrays[f"{h}_id"]) for h in L.HEADS},
            arrays["sample_id"],
        )
        self.split = split

    def describe(self) -> str:
        F, dv = self.video.shape[1:]
        return f"synthetic {self.split} split ({len(self)} samples, F={F}, dv={dv})"


def write_split(
    out: str | Path, arrays: dict[str, Any], F: int, dv: int, dtype: str = "float32", extra_meta: dict | None = None
) -> Path:
    """Write one split in the cached format of the contract."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vis_feats.npy", arrays["vis_feats"].astype(dtype))
    np.save(out / "telemetry.npy", arrays["telemetry"])
    for h in L.HEADS:
        np.save(out / f"{h}_id.npy", arrays[f"{h}_id"])
    (out / "sample_id.json").write_text(json.dumps(arrays["sample_id"]))
    meta = {"format_version": 1, "dv": int(dv), "F": int(F), "labels": L.LABELS, **(extra_meta or {})}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def write_dataset(
    out: str | Path,
    num_train: int = 2048,
    num_val: int = 512,
    F: int = 8,
    dv: int = 64,
    seed: int = 0,
    noise: float = 1.0,
    dtype: str = "float32",
) -> dict[str, Path]:
    """Write `out/train` and `out/val`; returns each split's directory."""
    paths = {}
    for split, n in (("train", num_train), ("val", num_val)):
        arrays = generate(n, F, dv, seed, split, noise)
        paths[split] = write_split(
            Path(out) / split, arrays, F, dv, dtype, {"generator": "sim.data.synthetic", "seed": seed}
        )
    return paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="synthetic")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        require(cfg, "out", "DIR")
        if cfg.dtype not in ("float32", "float16"):
            raise ConfigError(f"dtype={cfg.dtype!r}: expected float32 or float16")
        paths = write_dataset(
            cfg.out,
            int(cfg.num_train),
            int(cfg.num_val),
            int(cfg.F),
            int(cfg.dv),
            int(cfg.seed),
            float(cfg.noise),
            str(cfg.dtype),
        )
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        print(f"wrote {n} samples to {paths[split]}")


if __name__ == "__main__":
    main()
