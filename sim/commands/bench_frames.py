"""Benchmark: training from raw frames vs from the feature cache of the same encoder.

    python -m sim bench_frames vision=resnet18 vision.pretrained=false llm=tiny [num_samples=128]
        [num_val=32] [H=64] [W=64] [out=DIR] [any train.py override ...]

Writes a synthetic raw-frame split (sim.data.synthetic_frames), caches its features with the encoder
(sim.commands.cache_features: the cache's throughput in frames/s), then trains the same model twice for
`training.epochs` (default 3) through the real training path: once on the frames through the
frozen encoder, once on the cache (`vision=cached data=cached`). Prints samples/s of each (the
median over the epochs after the first, which pays for warm-up) and writes them to
`<out>/bench.json`. `threads=N` sets torch's CPU threads (on a machine shared with other work, one
thread gives steadier figures than several contended ones).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sim.commands.cache_features import cache_features
from sim.core.cli import CONF_DIR, command_line, compose, fail_cleanly
from sim.core.errors import ConfigError
from sim.data.synthetic_frames import write_frames_split


def _train_rate(run_dir: Path) -> float:
    """Median training samples/s over the epochs after the first (all of them if there is one)."""
    lines = (run_dir / "metrics" / "train_metrics.jsonl").read_text().splitlines()
    rates = [float(json.loads(line)["samples_per_s"]) for line in lines]
    return statistics.median(rates[1:] or rates)


def _data(option: str, root: Path) -> list[str]:
    """Overrides that read the train and val splits under `root` with the data option `option`."""
    return [f"data={option}", f"data.train_split_path={root}/train", f"data.val_split_path={root}/val"]


def _cache_frames(out: Path, frames_cfg: DictConfig) -> dict[str, float]:
    """Cache `<out>/frames` into `<out>/cache` with the frames run's encoder; its throughput and time."""
    F = int(frames_cfg.model.F)
    cache_cfg = compose(
        "cache_features",
        [
            "vision=tiny",
            *_data("frames", out / "frames"),
            f"out={out}/cache",
            "progress_bar=false",
            "overwrite=true",
            f"model.F={F}",
        ],
    )
    with open_dict(cache_cfg):
        cache_cfg.vision = frames_cfg.vision  # the very encoder the frames run uses, overrides and all
        cache_cfg.data.batch_size = frames_cfg.data.batch_size
    t0 = time.perf_counter()
    cached = cache_features(cache_cfg)
    cache_s = time.perf_counter() - t0
    n_frames = sum(r["rows"] for r in cached.values()) * F
    encode_s = sum(r["seconds"] for r in cached.values())
    return {"cache_frames_per_s": n_frames / encode_s, "cache_seconds": cache_s}


def bench(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the benchmark; returns the figures (also written to `<out>/bench.json`).

    Args:
        overrides: the command line (this command's keys and any train.py override); the frames run and
            the cache run compose conf/bench_frames.yaml with it, each with its own data option.
    """
    from sim.training.train import train  # loads the model stack (seconds): not for --help or --cfg job

    cfg = compose("bench_frames", overrides)
    out = Path(cfg.out or tempfile.mkdtemp(prefix="sim_bench_frames_"))
    n_train, n_val, H, W = int(cfg.num_samples), int(cfg.num_val), int(cfg.H), int(cfg.W)
    frames_cfg = compose("bench_frames", [*overrides, *_data("frames", out / "frames")])
    if frames_cfg.vision.kind == "cached":
        raise ConfigError("bench_frames needs an encoder: vision=tiny, vision=resnet18, ...")
    F = int(frames_cfg.model.F)
    for split, n in (("train", n_train), ("val", n_val)):
        write_frames_split(out / "frames" / split, n, F, H, W, split=split)
    cache = _cache_frames(out, frames_cfg)

    # Fresh run directories: figures of an earlier benchmark in the same out= must not mix in.
    for name in ("run_frames", "run_cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    train(frames_cfg, run_dir=out / "run_frames")
    cached_cfg = compose("bench_frames", [*overrides, "vision=cached", *_data("cached", out / "cache")])
    train(cached_cfg, run_dir=out / "run_cache")

    result = {
        "encoder": frames_cfg.vision.name_or_path,
        "vision": OmegaConf.to_container(frames_cfg.vision, resolve=True),
        "llm": frames_cfg.llm.name_or_path,
        "frames": [F, 3, H, W],
        "train_samples": n_train,
        "batch_size": int(frames_cfg.data.batch_size),
        "epochs": int(frames_cfg.training.epochs),
        **cache,
        "train_from_frames_samples_per_s": _train_rate(out / "run_frames"),
        "train_from_cache_samples_per_s": _train_rate(out / "run_cache"),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    result["out"] = str(out)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench_frames")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    with fail_cleanly():
        r = bench(command_line())
    speedup = r["train_from_cache_samples_per_s"] / r["train_from_frames_samples_per_s"]
    print(
        f"encoder {r['encoder']} ({r['vision']['kind']}, pretrained={r['vision']['pretrained']}), LLM {r['llm']}; "
        f"frames {'x'.join(map(str, r['frames']))}, {r['train_samples']} train samples, batch {r['batch_size']}, "
        f"{r['epochs']} epochs (median rate after the first), {r['torch_threads']} torch thread(s)"
    )
    print(f"  feature cache:      {r['cache_frames_per_s']:10.1f} frames/s")
    print(f"  train from frames:  {r['train_from_frames_samples_per_s']:10.1f} samples/s")
    print(f"  train from cache:   {r['train_from_cache_samples_per_s']:10.1f} samples/s  ({speedup:.1f}x)")
    print(f"  (figures in {r['out']}/bench.json)")


if __name__ == "__main__":
    main()
