"""Run a frozen vision encoder once over raw frames and write cached-feature splits.

    python -m sim.commands.cache_features vision=clip_vit_b32 data=frames \\
        data.train_split_path=data/frames/train data.val_split_path=data/frames/val out=data/clip

writes `out/train` and `out/val` in the cached-feature format (vis_feats.npy float16 by default,
telemetry, labels, weights, sample ids, meta.json), which then train at cached-feature speed:

    python train.py vision=cached data=cached data.train_split_path=data/clip/train data.val_split_path=data/clip/val

Resumable: features go into a preallocated memory-mapped array, and `cache_progress.json` (replaced
atomically after every batch is flushed) records how many rows are done; run the same command again
after an interruption and it goes on from there. `meta.json` is written last, so an unfinished cache
is never read as a finished one.

One encoder per directory: meta.json (and the progress file while running) records the encoder's
identity (its spec and a fingerprint of its weights); features of another encoder are refused
rather than mixed in. `overwrite=true` discards what is there and starts again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from sim.core import labels as L
from sim.core.checkpoint import atomic_write_bytes
from sim.core.cli import CONF_DIR, fail_cleanly
from sim.core.config import to_dict
from sim.core.errors import ConfigError, DataError, SimError
from sim.core.precision import resolve_device
from sim.data.dataset import SimDataset, collate_fn
from sim.models.vision import FrozenVisionEncoder, describe

log = logging.getLogger(__name__)

PROGRESS = "cache_progress.json"
PARTIAL_IDS = "sample_id.partial.jsonl"
OUTPUTS = (
    "vis_feats.npy",
    "telemetry.npy",
    "weight.npy",
    "sample_id.json",
    "meta.json",
    PROGRESS,
    PARTIAL_IDS,
    *(f"{h}_id.npy" for h in L.HEADS),
)
DTYPES = {"float16": np.float16, "float32": np.float32}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())
    os.chmod(path, 0o644)  # the temporary file it was renamed from is private; the split is data to share


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} there, {vb!r} now")
    return out


def _check_same_encoder(split_dir: Path, recorded: dict[str, Any] | None, encoder: dict[str, Any], where: str) -> None:
    if recorded is None:
        raise DataError(
            f"{split_dir} already holds a split that sim.commands.cache_features did not write "
            f"({where} has no encoder record); refusing to write features into it. Choose another out=DIR."
        )
    diffs = _differences(recorded, encoder)
    if diffs:
        raise DataError(
            f"{split_dir} holds features of another encoder ({describe(recorded.get('spec', {}))}) than this one "
            f"({describe(encoder['spec'])}); refusing to mix them. Differences: {'; '.join(diffs[:6])}. "
            "Choose another out=DIR, or overwrite=true to discard the old features."
        )


@dataclass
class _SplitCache:
    """One split directory being written: whose features it holds (`ident`), for which rows and
    settings (`job`), and its progress record."""

    out: Path
    ident: dict[str, Any]
    job: dict[str, Any]

    @property
    def progress_path(self) -> Path:
        return self.out / PROGRESS

    def is_finished(self) -> bool:
        """True when meta.json says this very cache is complete.

        Raises:
            DataError: it holds a finished cache of another encoder, other frames or settings.
        """
        meta_path = self.out / "meta.json"
        if not meta_path.is_file():
            return False
        meta = json.loads(meta_path.read_text())
        _check_same_encoder(self.out, meta.get("encoder"), self.ident, "meta.json")
        if meta.get("cache_job") != self.job:
            diffs = _differences(meta.get("cache_job") or {}, self.job)
            raise DataError(
                f"{self.out} holds a finished cache of other frames or settings ({'; '.join(diffs[:4])}); "
                "choose another out=DIR, or overwrite=true to recompute it"
            )
        return True

    def rows_done(self) -> int:
        """Rows an earlier, interrupted run of this same cache wrote (0 for a fresh directory).

        Raises:
            DataError: the directory holds an unfinished cache of another encoder or job, or a split
                not written here.
        """
        if self.progress_path.is_file():
            progress = json.loads(self.progress_path.read_text())
            _check_same_encoder(self.out, progress.get("encoder"), self.ident, PROGRESS)
            if progress.get("job") != self.job:
                diffs = _differences(progress.get("job") or {}, self.job)
                raise DataError(
                    f"{self.out} holds an unfinished cache of other frames or settings ({'; '.join(diffs[:4])}); "
                    "refusing to mix rows; run the original command again, or overwrite=true"
                )
            return int(progress["rows_done"])
        if any((self.out / name).exists() for name in ("vis_feats.npy", "frames.npy")):
            _check_same_encoder(self.out, None, self.ident, "the directory")
        return 0

    def record(self, rows_done: int) -> None:
        _write_json(self.progress_path, {"encoder": self.ident, "job": self.job, "rows_done": rows_done})

    def open_arrays(self, arrays: dict[str, tuple[Any, tuple[int, ...]]], done: int) -> dict[str, np.memmap]:
        """The memory-mapped output arrays: created for a fresh start, reopened to resume at row `done`."""
        partial_ids = self.out / PARTIAL_IDS
        if done == 0:
            # A fresh start, or a run stopped before its first batch: (re)create the arrays. The progress
            # record goes first, so a directory holding our arrays always says whose they are.
            self.record(0)
            maps = {
                name: np.lib.format.open_memmap(self.out / name, mode="w+", dtype=dt, shape=shp)
                for name, (dt, shp) in arrays.items()
            }
            partial_ids.write_text("")
            return maps
        maps = {name: np.load(self.out / name, mmap_mode="r+") for name in arrays}
        ids = partial_ids.read_text().splitlines()[:done] if partial_ids.is_file() else []
        if len(ids) != done:
            raise DataError(
                f"{partial_ids} has {len(ids)} sample ids but {PROGRESS} records {done} rows; "
                "overwrite=true to start again"
            )
        partial_ids.write_text("".join(i + "\n" for i in ids))
        log.info("resuming %s at row %d of %d", self.out, done, self.job["rows"])
        return maps

    def finish(self, maps: dict[str, np.memmap]) -> None:
        """sample_id.json, weight.npy only when it says something, then meta.json: the split is complete."""
        ids = (self.out / PARTIAL_IDS).read_text().splitlines()
        (self.out / "sample_id.json").write_text(json.dumps(ids))
        keep_weight = not np.all(np.asarray(maps["weight.npy"]) == 1.0)
        maps.clear()  # close the memory maps before a file goes
        if not keep_weight:  # the format's weight.npy is optional; all ones says nothing
            (self.out / "weight.npy").unlink()
        meta = {
            "format_version": 1,
            "dv": self.job["dv"],
            "F": self.job["F"],
            "labels": L.LABELS,
            "dtype": self.job["dtype"],
            "encoder": self.ident,
            "encoder_name": describe(self.ident["spec"]),
            "cache_job": self.job,
        }
        _write_json(self.out / "meta.json", meta)
        self.progress_path.unlink()
        (self.out / PARTIAL_IDS).unlink()


def _frames_per_sample(dataset: SimDataset) -> int:
    shape = tuple(dataset.video_shape())
    if len(shape) != 4 or shape[1] != 3:
        raise DataError(f"{dataset.describe()} yields samples of shape {list(shape)}, expected raw frames [F, 3, H, W]")
    return int(shape[0])


def _arrays(N: int, F: int, dv: int, dtype: str) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """name -> (dtype, shape) of each array a cached split holds."""
    return {
        "vis_feats.npy": (DTYPES[dtype], (N, F, dv)),
        "telemetry.npy": (np.float32, (N, 8)),
        "weight.npy": (np.float32, (N,)),
        **{f"{h}_id.npy": (np.int64, (N,)) for h in L.HEADS},
    }


def cache_split(
    dataset: SimDataset,
    encoder: FrozenVisionEncoder,
    out: str | Path,
    dtype: str = "float16",
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress_bar: bool = True,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode one raw-frame split into a cached-feature split directory, resuming where it stopped.

    Args:
        dataset: a SimDataset yielding `frames` (use_cached_vis_feats=False).
        encoder: the frozen encoder; its identity is recorded and checked.
        out: the split directory to write.
        dtype: float16 (default, half the disk) or float32 for vis_feats.npy.
        batch_size: samples per encoder batch (the encoder splits them further by frame_batch_size).
        source: a description of where the frames come from; a resume from another source is refused.

    Returns:
        {"path", "rows", "computed" (rows encoded by this call), "seconds", "frames_per_s"}.

    Raises:
        DataError: the directory holds another encoder's features, another source's rows, or a
            split not written here; or the encoder produced NaN/inf, or values float16 cannot hold.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected float16 or float32")
    out = Path(out)
    N, F, dv = len(dataset), _frames_per_sample(dataset), int(encoder.dv)
    job = {"rows": N, "F": F, "dv": dv, "dtype": dtype, "source": source or {"dataset": dataset.describe()}}
    cache = _SplitCache(out, encoder.identity(), job)
    if overwrite and out.is_dir():
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if cache.is_finished():
        log.info("%s is complete (%d rows of %s); nothing to do", out, N, describe(cache.ident["spec"]))
        return {"path": out, "rows": N, "computed": 0, "seconds": 0.0, "frames_per_s": None}
    done = cache.rows_done()
    maps = cache.open_arrays(_arrays(N, F, dv, dtype), done)
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=list(range(done, N)),
        num_workers=int(num_workers),
        collate_fn=collate_fn,
    )
    t0 = time.perf_counter()
    _encode(encoder.to(device).eval(), loader, cache, maps, done, device, progress_bar)
    seconds = time.perf_counter() - t0
    cache.finish(maps)
    computed = N - done
    fps = computed * F / seconds if computed and seconds > 0 else None
    rate = f", {fps:.1f} frames/s" if fps else ""
    log.info("wrote %s: %d rows of [%d, %d] %s (%d encoded now%s)", out, N, F, dv, dtype, computed, rate)
    return {"path": out, "rows": N, "computed": computed, "seconds": seconds, "frames_per_s": fps}


def _encode(
    encoder: FrozenVisionEncoder,
    loader: DataLoader,
    cache: _SplitCache,
    maps: dict[str, np.memmap],
    done: int,
    device: str | torch.device,
    progress_bar: bool,
) -> None:
    """Encode the rows from `done` on into `maps`, recording progress after each batch is on disk.

    Raises:
        DataError: the encoder produced NaN, inf or values the cache's dtype cannot hold.
    """
    dtype, N = cache.job["dtype"], cache.job["rows"]
    limit = float(np.finfo(DTYPES[dtype]).max)
    lo = done
    bar = tqdm(
        total=N,
        initial=done,
        unit="sample",
        desc=f"caching {cache.out.name}",
        file=sys.stderr,
        disable=None if progress_bar else True,
        dynamic_ncols=True,
    )
    with torch.inference_mode(), bar, (cache.out / PARTIAL_IDS).open("a") as ids_file:
        for batch in loader:
            hi = lo + batch["frames"].shape[0]
            feats = encoder(batch["frames"].to(device)).cpu().numpy()
            if not np.isfinite(feats).all() or np.abs(feats).max() > limit:
                raise DataError(
                    f"the encoder produced NaN, inf or values beyond {dtype} for samples {lo}..{hi - 1} "
                    f"({batch['sample_id'][0]}...); check those frames, or use dtype=float32"
                )
            maps["vis_feats.npy"][lo:hi] = feats
            maps["telemetry.npy"][lo:hi] = batch["telemetry"].numpy()
            maps["weight.npy"][lo:hi] = batch["weight"].numpy()
            for h in L.HEADS:
                maps[f"{h}_id.npy"][lo:hi] = batch[f"{h}_id"].numpy()
            for m in maps.values():
                m.flush()
            ids = (f"{i if i is not None else r}\n" for r, i in zip(range(lo, hi), batch["sample_id"], strict=True))
            ids_file.write("".join(ids))
            ids_file.flush()
            # Only after the rows are on disk does the record say so: a crash loses at most this batch.
            cache.record(hi)
            bar.update(hi - lo)
            lo = hi


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra's instantiate, re-raising SIM's own errors unwrapped so the user sees their message."""
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, SimError):
            raise exc.__cause__ from None
        raise


def cache_features(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Cache every split of `cfg.data` listed in `cfg.splits` under `cfg.out/<split>`.

    Raises:
        ConfigError: no `out`, `vision=cached` (no encoder to run), an unknown split or dtype.
        DataError, LLMLoadError: see `cache_split` and `sim.models.vision.build_encoder`.
    """
    if OmegaConf.is_missing(cfg, "out") or not cfg.out:
        raise ConfigError("out must be set: the directory to write the cached splits into (out=DIR)")
    if cfg.vision.get("kind", "cached") == "cached":
        raise ConfigError(
            "vision=cached has no encoder to run; pick one (vision=tiny, vision=clip_vit_b32, vision=resnet18, ...)"
        )
    for split in cfg.splits:
        if split not in ("train", "val"):
            raise ConfigError(f"splits: unknown split {split!r}; expected train and/or val")
    device = resolve_device(cfg.device)
    data = _instantiate(cfg.data, use_cached_vis_feats=False)
    encoder = _instantiate(cfg.vision).to(device)
    out = Path(cfg.out)
    log.info("encoder %s (dv=%d); writing %s", describe(encoder.sim_spec), encoder.dv, out)
    data_cfg = to_dict(cfg.data)
    results = {}
    for split in cfg.splits:
        dataset = data.split(split)
        split_path = data_cfg.get(f"{split}_split_path")
        source = {
            "dataset_class_path": data_cfg.get("dataset_class_path"),
            "split_path": None if split_path is None else str(Path(split_path).resolve()),
            "kwargs": data_cfg.get("dataset_kwargs") or {},
            "split_kwargs": data_cfg.get(f"{split}_kwargs") or {},
        }
        results[split] = cache_split(
            dataset,
            encoder,
            out / split,
            dtype=str(cfg.dtype),
            batch_size=int(cfg.data.batch_size),
            num_workers=int(cfg.data.num_workers),
            device=device,
            overwrite=bool(cfg.overwrite),
            progress_bar=bool(cfg.progress_bar),
            source=source,
        )
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache_features")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        results = cache_features(cfg)
    for split, r in results.items():
        rate = f", {r['frames_per_s']:.1f} frames/s" if r["frames_per_s"] else ""
        print(f"{split}: {r['path']} ({r['rows']} samples, {r['computed']} encoded now{rate})")


if __name__ == "__main__":
    main()
