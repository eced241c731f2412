"""Synthetic raw-frame rover scenes: the rules of `sim.data.synthetic`, drawn as pixels.

The latent scenes, labels and telemetry are those of `sim/data/synthetic.py` (same `sample_scenes`,
`rules`, `telemetry_for`); only the video differs. Each frame shows sky over ground, and the hazard:

    type (reason)  its shape and colour: human a tall red ellipse, obstacle a blue square,
                   tight_space two green walls with a gap, unknown a yellow diamond
    side           its horizontal position: left or right of the centre
    proximity      its size, growing over the window as the rover closes in (closer means bigger)

plus per-sample lighting and per-pixel noise. The speed is only in the telemetry, so as with
`data=synthetic` both branches are needed to predict risk and action.

Deterministic by seed; in memory (`data=synthetic_frames`) and on disk (same arrays) in the raw-frame
split format (frames.npy [N, F, 3, H, W] uint8, "H" and "W" in meta.json):

    python -m sim frames out=DIR [num_train=1024] [num_val=256] [F=8] [H=32] [W=32] [seed=0] [noise=10.0]
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from sim.core import labels as L
from sim.core.checkpoint import atomic_write_bytes
from sim.core.cli import CONF_DIR, fail_cleanly, require
from sim.core.errors import ConfigError
from sim.data.dataset import TensorSplit
from sim.data.synthetic import SPLIT_OFFSET, Scenes, sample_scenes, telemetry_for

# RGB of each hazard type, by reason id: human, obstacle, tight_space, unknown.
HAZARD_RGB = np.array([[220, 40, 40], [40, 70, 220], [40, 190, 60], [230, 200, 40]], dtype=np.float32)
SKY_RGB = np.array([135, 170, 205], dtype=np.float32)
GROUND_RGB = np.array([110, 95, 80], dtype=np.float32)
# Inside-tests of each hazard type's shape, by reason id, in offsets from the hazard's centre
# measured in its half-height (x already corrected for the aspect ratio).
SHAPES = (
    lambda dx, dy: (dx / 0.4) ** 2 + dy**2 <= 1.0,  # human: a tall ellipse
    lambda dx, dy: (np.abs(dx) <= 0.65) & (np.abs(dy) <= 0.65),  # obstacle: a square
    lambda dx, dy: (np.abs(dy) <= 1.0) & (np.abs(dx) >= 0.25) & (np.abs(dx) <= 0.7),  # tight space: two walls
    lambda dx, dy: np.abs(dx) + np.abs(dy) <= 0.8,  # unknown: a diamond
)
HORIZON = 0.4  # share of the image height that is sky
PIXEL_BUDGET = 1 << 22  # pixels rendered at once (per colour channel): bounded memory at any image size


def chunk_size(F: int, H: int, W: int) -> int:
    """Samples rendered at once. Depends only on the frame geometry, so the same split comes out
    the same in memory and on disk."""
    return max(1, min(256, PIXEL_BUDGET // (F * H * W)))


def _rng(seed: int, split: str, stream: int) -> np.random.Generator:
    # crc32, not hash(): str hashes change from one process to the next.
    return np.random.default_rng([int(seed), SPLIT_OFFSET.get(split, zlib.crc32(split.encode())), int(stream)])


def hazard_geometry(scenes: Scenes, F: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and half-height of the hazard per frame, in image units ([N, F] each).

    The size follows `sim.data.synthetic.features_for`'s approach ramp: proximity times a ramp from 0.7
    to 1 over the window, so the hazard grows frame by frame and a close one is big.
    """
    n = scenes.reason.shape[0]
    ramp = 0.7 + 0.3 * (np.arange(F) / max(F - 1, 1))
    closeness = np.clip(scenes.proximity[:, None] * ramp[None, :], 0.0, 1.0)
    half = 0.08 + 0.28 * closeness
    cx = 0.5 + 0.25 * scenes.side[:, None] + rng.uniform(-0.04, 0.04, (n, 1))
    cy = 0.62 + rng.uniform(-0.04, 0.04, (n, 1))
    return np.broadcast_to(cx, (n, F)), np.broadcast_to(cy, (n, F)), half


def render(scenes: Scenes, F: int, H: int, W: int, rng: np.random.Generator, noise: float = 10.0) -> np.ndarray:
    """Frames [N, F, 3, H, W] uint8 of the scenes (see the module docstring for what is drawn)."""
    n = scenes.reason.shape[0]
    cx, cy, half = hazard_geometry(scenes, F, rng)
    ys = ((np.arange(H) + 0.5) / H)[None, None, :, None]
    xs = ((np.arange(W) + 0.5) / W)[None, None, None, :]
    # Normalized offsets from the hazard's centre, in units of its half-height: [N, F, H, W].
    dy = ((ys - cy[..., None, None]) / half[..., None, None]).astype(np.float32)
    dx = ((xs - cx[..., None, None]) * (W / H) / half[..., None, None]).astype(np.float32)
    dx, dy = np.broadcast_arrays(dx, dy)  # both [N, F, H, W]
    mask = np.zeros(dy.shape, dtype=bool)
    for reason, inside in enumerate(SHAPES):
        sel = scenes.reason == reason
        if sel.any():
            mask[sel] = inside(dx[sel], dy[sel])
    sky = (ys < HORIZON)[..., None]  # [1, 1, H, 1, 1]
    background = np.where(sky, SKY_RGB, GROUND_RGB)  # [1, 1, H, 1, 3]
    light = rng.uniform(0.8, 1.2, (n, 1, 1, 1, 1)).astype(np.float32)
    img = np.where(mask[..., None], HAZARD_RGB[scenes.reason][:, None, None, None, :], background) * light
    img = img + float(noise) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(0, 1, 4, 2, 3)


def generate_frames(
    num_samples: int,
    F: int = 8,
    H: int = 32,
    W: int = 32,
    seed: int = 0,
    split: str = "train",
    noise: float = 10.0,
    out: np.ndarray | None = None,
) -> dict[str, Any]:
    """All arrays of one split, keyed as in the raw-frame split format.

    Frames are rendered `chunk_size(F, H, W)` samples at a time, each chunk from its own random stream, so the
    result is the same whether it lands in memory or (`out`, e.g. a memory map) on disk.
    """
    n = int(num_samples)
    if min(F, H, W) < 1 or n < 0:
        raise ConfigError(
            f"synthetic frames need positive F, H, W and num_samples >= 0 (got F={F}, H={H}, W={W}, num_samples={n})"
        )
    rng = _rng(seed, split, 0)
    scenes = sample_scenes(n, rng)
    telemetry = telemetry_for(scenes, rng)
    frames = np.empty((n, F, 3, H, W), dtype=np.uint8) if out is None else out
    step = chunk_size(F, H, W)
    for c, lo in enumerate(range(0, n, step)):
        part = Scenes(*(getattr(scenes, f)[lo : lo + step] for f in Scenes.__dataclass_fields__))
        frames[lo : lo + step] = render(part, F, H, W, _rng(seed, split, c + 1), noise)
    return {
        "frames": frames,
        "telemetry": telemetry,
        "risk_id": scenes.risk.astype(np.int64),
        "reason_id": scenes.reason.astype(np.int64),
        "action_id": scenes.action.astype(np.int64),
        "sample_id": [f"synthframes-{split}-{seed}-{i:06d}" for i in range(n)],
        "scenes": scenes,
    }


class SyntheticFramesDataset(TensorSplit):
    """`data=synthetic_frames`: raw-frame rover scenes generated in memory (see the module docstring)."""

    def __init__(
        self,
        data_path: str | Path | None = None,
        use_cached_vis_feats: bool = False,
        num_samples: int = 1024,
        F: int = 8,
        H: int = 32,
        W: int = 32,
        seed: int = 0,
        split: str = "train",
        noise: float = 10.0,
    ) -> None:
        super().__init__(data_path, use_cached_vis_feats)
        if use_cached_vis_feats:
            raise ConfigError(
                "data=synthetic_frames yields raw frames, which need a vision encoder: pick one "
                "(vision=tiny, vision=resnet18, ...) instead of vision=cached, or use data=synthetic for features"
            )
        arrays = generate_frames(num_samples, F, H, W, seed, split, noise)
        self.set_tensors(
            torch.from_numpy(arrays["frames"]),
            torch.from_numpy(arrays["telemetry"]),
            {h: torch.from_numpy(arrays[f"{h}_id"]) for h in L.HEADS},
            arrays["sample_id"],
        )
        self.split = split

    def describe(self) -> str:
        F, _, H, W = self.video.shape[1:]
        return f"synthetic frames {self.split} split ({len(self)} samples, F={F}, {H}x{W} px)"


def write_frames_split(
    out: str | Path,
    num_samples: int,
    F: int = 8,
    H: int = 32,
    W: int = 32,
    seed: int = 0,
    split: str = "train",
    noise: float = 10.0,
) -> Path:
    """Write one synthetic split in the raw-frame format; frames go straight into a memory map."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = np.lib.format.open_memmap(
        out / "frames.npy", mode="w+", dtype=np.uint8, shape=(int(num_samples), F, 3, H, W)
    )
    arrays = generate_frames(num_samples, F, H, W, seed, split, noise, out=frames)
    frames.flush()
    del frames
    np.save(out / "telemetry.npy", arrays["telemetry"])
    for h in L.HEADS:
        np.save(out / f"{h}_id.npy", arrays[f"{h}_id"])
    (out / "sample_id.json").write_text(json.dumps(arrays["sample_id"]))
    meta = {
        "format_version": 1,
        "F": int(F),
        "H": int(H),
        "W": int(W),
        "labels": L.LABELS,
        "generator": "sim.data.synthetic_frames",
        "seed": int(seed),
        "noise": float(noise),
    }
    # meta.json last: a split without it is refused, so an interrupted write is never read as whole.
    atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=1).encode())
    os.chmod(out / "meta.json", 0o644)  # the temporary file it was renamed from is private
    return out


def write_frames_dataset(
    out: str | Path,
    num_train: int = 1024,
    num_val: int = 256,
    F: int = 8,
    H: int = 32,
    W: int = 32,
    seed: int = 0,
    noise: float = 10.0,
) -> dict[str, Path]:
    """Write `out/train` and `out/val`; returns each split's directory."""
    return {
        split: write_frames_split(Path(out) / split, n, F, H, W, seed, split, noise)
        for split, n in (("train", num_train), ("val", num_val))
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="frames")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        require(cfg, "out", "DIR")
        paths = write_frames_dataset(
            cfg.out,
            int(cfg.num_train),
            int(cfg.num_val),
            int(cfg.F),
            int(cfg.H),
            int(cfg.W),
            int(cfg.seed),
            float(cfg.noise),
        )
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        print(f"wrote {n} samples ({cfg.F} frames of {cfg.H}x{cfg.W}) to {paths[split]}")


if __name__ == "__main__":
    main()
