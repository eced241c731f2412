"""Benchmark: training from raw frames vs from the feature cache of the same encoder.

    python -m sim.bench_frames vision=resnet18 vision.pretrained=false llm=tiny [num_samples=128]
        [num_val=32] [H=64] [W=64] [out=DIR] [any train.py override ...]

Writes a synthetic raw-frame split (sim.frames), caches its features with the encoder
(sim.cache_features: the cache's throughput in frames/s), then trains the same model twice for
`training.epochs` (default 3) through the real training path: once on the frames through the
frozen encoder, once on the cache (`vision=cached data=cached`). Prints samples/s of each (the
median over the epochs after the first, which pays for warm-up) and writes them to
`<out>/bench.json`. `threads=N` sets torch's CPU threads (on a machine shared with other work, one
thread gives steadier figures than several contended ones).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from sim.cli import fail_cleanly
from sim.synthetic import parse_overrides

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parent.parent / "conf"
BENCH_KEYS = {"num_samples": 128, "num_val": 32, "H": 64, "W": 64, "out": "", "threads": 0}


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train_rate(run_dir: Path) -> float:
    """Median training samples/s over the epochs after the first (all of them if there is one)."""
    lines = (run_dir / "metrics" / "train_metrics.jsonl").read_text().splitlines()
    rates = [float(json.loads(line)["samples_per_s"]) for line in lines]
    return statistics.median(rates[1:] or rates)


def bench(opts: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Run the benchmark; returns the figures (also written to `<out>/bench.json`)."""
    from sim.cache_features import cache_features
    from sim.frames import write_frames_split
    from sim.train import train

    out = Path(opts["out"] or tempfile.mkdtemp(prefix="sim_bench_frames_"))
    base = ["training.progress_bar=false", "checkpoint.save_every_epoch=false"]
    if not any(o.startswith("training.epochs=") for o in overrides):
        base.append("training.epochs=3")
    if not any(o.startswith("vision=") for o in overrides):
        base.append("vision=tiny")
    frames_cfg = _compose("train", [*base, *overrides, "data=frames", f"data.train_split_path={out}/frames/train",
                                    f"data.val_split_path={out}/frames/val"])
    if frames_cfg.vision.kind == "cached":
        raise SystemExit("bench_frames needs an encoder: vision=tiny, vision=resnet18, ...")
    F = int(frames_cfg.model.F)
    for split, n in (("train", opts["num_samples"]), ("val", opts["num_val"])):
        write_frames_split(out / "frames" / split, n, F, opts["H"], opts["W"], split=split)

    cache_cfg = _compose("cache_features", ["vision=tiny", "data=frames", f"data.train_split_path={out}/frames/train",
                                            f"data.val_split_path={out}/frames/val", f"out={out}/cache",
                                            "progress_bar=false", "overwrite=true", f"model.F={F}"])
    with open_dict(cache_cfg):
        cache_cfg.vision = frames_cfg.vision  # the very encoder the frames run uses, overrides and all
        cache_cfg.data.batch_size = frames_cfg.data.batch_size
    t0 = time.perf_counter()
    cached = cache_features(cache_cfg)
    cache_s = time.perf_counter() - t0
    n_frames = sum(r["rows"] for r in cached.values()) * F
    encode_s = sum(r["seconds"] for r in cached.values())

    # Fresh run directories: figures of an earlier benchmark in the same out= must not mix in.
    for name in ("run_frames", "run_cache"):
        shutil.rmtree(out / name, ignore_errors=True)
    train(frames_cfg, run_dir=out / "run_frames")
    cached_cfg = _compose("train", [*base, *overrides, "vision=cached", "data=cached", f"data.train_split_path={out}/cache/train",
                                    f"data.val_split_path={out}/cache/val"])
    train(cached_cfg, run_dir=out / "run_cache")

    result = {
        "encoder": frames_cfg.vision.name_or_path,
        "vision": OmegaConf.to_container(frames_cfg.vision, resolve=True),
        "llm": frames_cfg.llm.name_or_path,
        "frames": [F, 3, opts["H"], opts["W"]],
        "train_samples": opts["num_samples"],
        "batch_size": int(frames_cfg.data.batch_size),
        "epochs": int(frames_cfg.training.epochs),
        "cache_frames_per_s": n_frames / encode_s,
        "cache_seconds": cache_s,
        "train_from_frames_samples_per_s": _train_rate(out / "run_frames"),
        "train_from_cache_samples_per_s": _train_rate(out / "run_cache"),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    result["out"] = str(out)
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    mine = [a for a in argv if a.partition("=")[0] in BENCH_KEYS]
    overrides = [a for a in argv if a not in mine]
    opts = parse_overrides(mine, BENCH_KEYS)
    # Warnings only on the console: each run logs everything to its own logs/stdout.log.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    logging.getLogger().addHandler(console)
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    with fail_cleanly():
        r = bench(opts, overrides)
    speedup = r["train_from_cache_samples_per_s"] / r["train_from_frames_samples_per_s"]
    print(f"encoder {r['encoder']} ({r['vision']['kind']}, pretrained={r['vision']['pretrained']}), LLM {r['llm']}; "
          f"frames {'x'.join(map(str, r['frames']))}, {r['train_samples']} train samples, batch {r['batch_size']}, "
          f"{r['epochs']} epochs (median rate after the first), {r['torch_threads']} torch thread(s)")
    print(f"  feature cache:      {r['cache_frames_per_s']:10.1f} frames/s")
    print(f"  train from frames:  {r['train_from_frames_samples_per_s']:10.1f} samples/s")
    print(f"  train from cache:   {r['train_from_cache_samples_per_s']:10.1f} samples/s  ({speedup:.1f}x)")
    print(f"  (figures in {r['out']}/bench.json)")


if __name__ == "__main__":
    main()
