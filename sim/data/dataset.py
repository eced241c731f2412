"""Datasets (config group `data`) and batching.

Every dataset yields dicts:
    vis_feats [F, dv] float   (cached features)   or   frames [F, 3, H, W] uint8/float (raw)
    telemetry [8] float       [ax, ay, az, gx, gy, gz, v, w], raw: the model normalizes it
    risk_id, reason_id, action_id  int
    weight float (optional), sample_id str (optional)

Any subclass of `SimDataset` that yields these plugs in by import path (`data.dataset_class_path`).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sim.core import labels as L
from sim.core.config import select_required, to_dict
from sim.core.errors import ConfigError, DataError
from sim.data.validate import SampleValidator, SimDataLoader, SkipLog, ValidatedDataset

log = logging.getLogger(__name__)

LABEL_KEYS = tuple(f"{h}_id" for h in L.HEADS)  # risk_id, reason_id, action_id


class SimDataset(Dataset):
    """Base class of SIM datasets.

    Args:
        data_path: where the split lives (its meaning is the subclass's).
        use_cached_vis_feats: yield `vis_feats` (True) or raw `frames` (False).

    Subclasses implement `__len__` and `__getitem__`. They may override `label_arrays` and
    `telemetry_array` with fast versions (the defaults read every sample once).
    """

    def __init__(self, data_path: str | Path | None = None, use_cached_vis_feats: bool = True) -> None:
        self.data_path = None if data_path is None else str(data_path)
        self.use_cached_vis_feats = bool(use_cached_vis_feats)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, idx: int) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def video_key(self) -> str:
        return "vis_feats" if self.use_cached_vis_feats else "frames"

    def describe(self) -> str:
        return f"{type(self).__name__}({self.data_path or ''})"

    def video_shape(self) -> tuple[int, ...]:
        """Shape of one sample's video entry ([F, dv] or [F, 3, H, W]).

        Raises:
            DataError: the sample has no entry under the key the vision option asks for.
        """
        sample = self[0]
        if self.video_key not in sample:
            raise DataError(
                f"{self.describe()}: sample 0 has no {self.video_key!r} (its keys: {', '.join(sample)}); "
                + (
                    "vision=cached reads features vis_feats [F, dv]"
                    if self.use_cached_vis_feats
                    else "a vision encoder reads raw frames [F, 3, H, W]; for features use vision=cached"
                )
            )
        return tuple(torch.as_tensor(sample[self.video_key]).shape)

    def label_arrays(self) -> dict[str, np.ndarray]:
        """{"risk": [N], "reason": [N], "action": [N]} integer labels of the whole split."""
        out: dict[str, list[int]] = {h: [] for h in L.HEADS}
        for i in range(len(self)):
            s = self[i]
            for h in L.HEADS:
                value = s.get(f"{h}_id") if isinstance(s, dict) else None
                label = (
                    int(value)
                    if isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                    else (
                        int(value.item())
                        if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point()
                        else -1
                    )
                )
                if not 0 <= label < L.NUM_CLASSES[h]:
                    sid = s.get("sample_id") if isinstance(s, dict) else None
                    expected = f"0..{L.NUM_CLASSES[h] - 1} ({', '.join(L.LABELS[h])})"
                    raise DataError(
                        f"{self.describe()}: sample {i} (sample_id {sid!r}) "
                        f"has {h}_id={value!r}; expected an integer in {expected}"
                    )
                out[h].append(label)
        return {h: np.asarray(v, dtype=np.int64) for h, v in out.items()}

    def telemetry_array(self) -> np.ndarray:
        """[N, 8] raw telemetry of the whole split (for normalization statistics). A sample whose
        telemetry cannot be read gives a row of NaN: the statistics leave it out, and the sample
        itself is refused (or skipped) when its batch is read."""
        rows = []
        for i in range(len(self)):
            try:
                row = np.asarray(self[i]["telemetry"], dtype=np.float64).reshape(8)
            except (KeyError, TypeError, ValueError, IndexError):
                row = np.full(8, np.nan)
            rows.append(row)
        return np.stack(rows)


class TensorSplit(SimDataset):
    """A split held in memory as tensors (the generated data sets): one indexing serves a sample and a
    whole batch (`__getitems__` returns it already collated)."""

    def set_tensors(
        self, video: torch.Tensor, telemetry: torch.Tensor, labels: dict[str, torch.Tensor], sample_ids: list[str]
    ) -> None:
        self.video, self.telemetry, self.labels, self.sample_ids = video, telemetry, labels, sample_ids

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {
            self.video_key: self.video[idx],
            "telemetry": self.telemetry[idx],
            **{f"{h}_id": int(self.labels[h][idx]) for h in L.HEADS},
            "sample_id": self.sample_ids[idx],
        }

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {
            self.video_key: self.video[idx],
            "telemetry": self.telemetry[idx],
            **{f"{h}_id": self.labels[h][idx] for h in L.HEADS},
            "weight": torch.ones(len(indices)),
            "sample_id": [self.sample_ids[i] for i in idx.tolist()],
        }

    def video_shape(self) -> tuple[int, ...]:
        return tuple(self.video.shape[1:])

    def label_arrays(self) -> dict[str, np.ndarray]:
        return {h: v.numpy() for h, v in self.labels.items()}

    def telemetry_array(self) -> np.ndarray:
        return self.telemetry.numpy().astype(np.float64)


class DummySimDataset(TensorSplit):
    """Random tensors and labels: checks that the plumbing runs; nothing in it can be learned."""

    def __init__(
        self,
        data_path: str | Path | None = None,
        use_cached_vis_feats: bool = True,
        num_samples: int = 256,
        F: int = 8,
        dv: int = 768,
        H: int = 32,
        W: int = 32,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        super().__init__(data_path, use_cached_vis_feats)
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        n = int(num_samples)
        if use_cached_vis_feats:
            video = torch.randn(n, F, dv, generator=g)
        else:
            video = torch.randint(0, 256, (n, F, 3, H, W), generator=g, dtype=torch.uint8)
        telemetry = torch.randn(n, 8, generator=g)
        labels = {h: torch.randint(0, L.NUM_CLASSES[h], (n,), generator=g) for h in L.HEADS}
        self.set_tensors(video, telemetry, labels, [f"dummy-{split}-{i}" for i in range(n)])
        self.split = split


def read_meta(split_dir: Path) -> dict[str, Any]:
    meta_path = split_dir / "meta.json"
    if not meta_path.is_file():
        if (split_dir / "cache_progress.json").is_file():
            raise DataError(
                f"{split_dir} is an unfinished feature cache (meta.json is written last); "
                "run the same `python -m sim.cache_features ...` command again to finish it"
            )
        raise DataError(f"{meta_path} is missing: a cached split needs meta.json (format_version, dv, F, labels)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != 1:
        raise DataError(f"{meta_path}: format_version is {meta.get('format_version')!r}, expected 1")
    labels = meta.get("labels")
    if labels is not None and {k: list(v) for k, v in labels.items() if k in L.LABELS} != L.LABELS:
        raise DataError(f"{meta_path}: labels {labels} differ from SIM's label maps {L.LABELS}")
    return meta


class CachedSplitDataset(SimDataset):
    """A split on disk (see README, "Data formats"), read through memory maps.

    Nothing but the label arrays is read at open; rows are read when a batch asks for them, so a
    split larger than RAM trains. `__getitems__` reads a whole batch with one indexed read per array.

    Raises:
        DataError: the directory, meta.json or an array is missing, or shapes, dtypes or label
            ranges are not what the format says (the message names the file).
    """

    def __init__(self, data_path: str | Path, use_cached_vis_feats: bool = True) -> None:
        super().__init__(data_path, use_cached_vis_feats)
        if data_path is None:
            raise DataError("a cached split needs a path (data.train_split_path / data.val_split_path)")
        root = Path(data_path)
        if not root.is_dir():
            raise DataError(f"split directory not found: {root}")
        self.root = root
        self.meta = read_meta(root)
        video_file = "vis_feats.npy" if use_cached_vis_feats else "frames.npy"
        self.video = self._open(video_file)
        n = self.video.shape[0]
        if use_cached_vis_feats:
            self._expect(video_file, self.video, ndim=3, kinds="f", dtypes=(np.float16, np.float32))
            if "dv" in self.meta and self.video.shape[2] != self.meta["dv"]:
                raise DataError(f"{root / video_file}: dv is {self.video.shape[2]}, meta.json says {self.meta['dv']}")
        else:
            self._expect(video_file, self.video, ndim=5, kinds="u", dtypes=(np.uint8,))
            if self.video.shape[2] != 3:
                raise DataError(f"{root / video_file}: shape {self.video.shape}, expected [N, F, 3, H, W]")
            for key, axis in (("H", 3), ("W", 4)):
                if key in self.meta and self.video.shape[axis] != self.meta[key]:
                    raise DataError(
                        f"{root / video_file}: {key} is {self.video.shape[axis]}, meta.json says {self.meta[key]}"
                    )
        if "F" in self.meta and self.video.shape[1] != self.meta["F"]:
            raise DataError(f"{root / video_file}: F is {self.video.shape[1]}, meta.json says {self.meta['F']}")
        self.telemetry = self._open("telemetry.npy")
        if self.telemetry.shape != (n, 8):
            raise DataError(f"{root / 'telemetry.npy'}: shape {self.telemetry.shape}, expected ({n}, 8)")
        self._expect("telemetry.npy", self.telemetry, ndim=2, kinds="f", dtypes=(np.float16, np.float32, np.float64))
        self.labels: dict[str, np.ndarray] = {}
        for head in L.HEADS:
            name = f"{head}_id.npy"
            arr = np.asarray(self._open(name))
            if arr.shape != (n,) or arr.dtype.kind not in "iu":
                raise DataError(f"{root / name}: shape {arr.shape} dtype {arr.dtype}, expected [{n}] integers")
            bad = np.flatnonzero((arr < 0) | (arr >= L.NUM_CLASSES[head]))
            if bad.size:
                raise DataError(
                    f"{root / name}: label {int(arr[bad[0]])} at sample {int(bad[0])} is out of range "
                    f"0..{L.NUM_CLASSES[head] - 1} ({', '.join(L.LABELS[head])}); {bad.size} bad in all"
                )
            self.labels[head] = arr.astype(np.int64)
        self.weight = None
        if (root / "weight.npy").is_file():
            self.weight = np.asarray(self._open("weight.npy"), dtype=np.float32)
            if self.weight.shape != (n,):
                raise DataError(f"{root / 'weight.npy'}: shape {self.weight.shape}, expected ({n},)")
        self.sample_ids: list[str] | None = None
        if (root / "sample_id.json").is_file():
            ids = json.loads((root / "sample_id.json").read_text())
            if not isinstance(ids, list) or len(ids) != n:
                raise DataError(f"{root / 'sample_id.json'}: expected a JSON list of {n} strings")
            self.sample_ids = [str(x) for x in ids]

    def _open(self, name: str) -> np.ndarray:
        path = self.root / name
        if not path.is_file():
            raise DataError(f"{path} is missing from the split")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path} is not a readable .npy array: {exc}") from exc

    def _expect(self, name: str, arr: np.ndarray, ndim: int, kinds: str, dtypes: tuple) -> None:
        if arr.ndim != ndim or arr.dtype not in [np.dtype(d) for d in dtypes]:
            raise DataError(
                f"{self.root / name}: shape {arr.shape} dtype {arr.dtype}, expected {ndim} dimensions of "
                f"{' or '.join(np.dtype(d).name for d in dtypes)}"
            )

    def __len__(self) -> int:
        return int(self.video.shape[0])

    def describe(self) -> str:
        return f"cached split {self.root} ({len(self)} samples)"

    def video_shape(self) -> tuple[int, ...]:
        return tuple(self.video.shape[1:])

    def _video_tensor(self, rows: np.ndarray) -> torch.Tensor:
        if self.use_cached_vis_feats:
            return torch.from_numpy(np.array(rows, dtype=np.float32))  # a copy: never a view of the read-only map
        return torch.from_numpy(np.array(rows))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        return {
            self.video_key: self._video_tensor(self.video[idx]),
            "telemetry": torch.from_numpy(np.array(self.telemetry[idx], dtype=np.float32)),
            **{f"{h}_id": int(self.labels[h][idx]) for h in L.HEADS},
            "weight": 1.0 if self.weight is None else float(self.weight[idx]),
            "sample_id": self.sample_ids[idx] if self.sample_ids else str(idx),
        }

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """A whole batch, already collated: one indexed read per memory-mapped array."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # ascending reads are kinder to the page cache
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        sorted_idx = idx[order]
        batch: dict[str, Any] = {
            self.video_key: self._video_tensor(self.video[sorted_idx][inv]),
            "telemetry": torch.from_numpy(np.asarray(self.telemetry[sorted_idx][inv], dtype=np.float32)),
            "weight": torch.ones(idx.size) if self.weight is None else torch.from_numpy(self.weight[idx].copy()),
            "sample_id": [self.sample_ids[i] if self.sample_ids else str(i) for i in idx.tolist()],
        }
        for h in L.HEADS:
            batch[f"{h}_id"] = torch.from_numpy(self.labels[h][idx])
        return batch

    def label_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.labels)

    def telemetry_array(self) -> np.ndarray:
        return np.asarray(self.telemetry, dtype=np.float64)


def collate_fn(samples: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack samples into a batch. A dataset's `__getitems__` may hand over a collated batch already.

    Raises:
        DataError: a sample misses a key, or shapes differ between samples (named by sample_id).
    """
    if isinstance(samples, dict):
        return samples
    if not samples:
        raise DataError("empty batch")
    first = samples[0]
    video_key = "vis_feats" if "vis_feats" in first else "frames"
    batch: dict[str, Any] = {}
    for key in (video_key, "telemetry"):
        try:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
        except KeyError as exc:
            raise DataError(
                f"a sample has no {exc.args[0]!r} (expected keys: {video_key}, telemetry, {', '.join(LABEL_KEYS)})"
            ) from exc
        except RuntimeError as exc:
            shapes = {str(s.get("sample_id", i)): tuple(torch.as_tensor(s[key]).shape) for i, s in enumerate(samples)}
            raise DataError(f"samples disagree on the shape of {key!r}: {shapes}") from exc
    if video_key == "vis_feats":
        batch[video_key] = batch[video_key].float()
    batch["telemetry"] = batch["telemetry"].float()
    for key in LABEL_KEYS:
        try:
            batch[key] = torch.as_tensor([int(s[key]) for s in samples], dtype=torch.long)
        except KeyError:
            raise DataError(f"a sample has no {key!r} label") from None
    batch["weight"] = torch.as_tensor([float(s.get("weight", 1.0)) for s in samples], dtype=torch.float32)
    batch["sample_id"] = [None if s.get("sample_id") is None else str(s["sample_id"]) for s in samples]
    return batch


def import_class(path: str) -> type:
    """Import `package.module.ClassName`.

    Raises:
        ConfigError: the path does not name an importable class (data.dataset_class_path).
    """
    module_name, _, cls_name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"data.dataset_class_path={path!r} must be a dotted path like my_pkg.module.MyDataset")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"data.dataset_class_path={path!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        cls = getattr(module, cls_name)
    except AttributeError:
        raise ConfigError(f"data.dataset_class_path={path!r}: {module_name} has no {cls_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise ConfigError(f"data.dataset_class_path={path!r} is not a Dataset class")
    return cls


@dataclass
class SimData:
    """The train and val splits of a run and how to batch them (what `data=...` instantiates)."""

    train: SimDataset
    val: SimDataset
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    on_bad_sample: str = "error"  # error | skip: what the loader does with a sample that fails validation
    # The per-sample video shape batches are checked against; None: the train split's.
    expected_video_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.skip_log = SkipLog()

    def log_skipped_to(self, path: str | Path) -> None:
        """Where `on_bad_sample=skip` lists the samples it drops (the run's logs/skipped_samples.txt)."""
        self.skip_log.path = Path(path)

    def split(self, name: str) -> SimDataset:
        if name not in ("train", "val"):
            raise ConfigError(f"unknown split {name!r}; expected train or val")
        return getattr(self, name)

    def loader(self, split: str, shuffle: bool = False, seed: int = 0, sampler: Any = None) -> DataLoader:
        dataset = self.split(split)
        g = torch.Generator().manual_seed(int(seed))
        # Every batch is checked (keys, shapes, dtypes, finite values, label ranges) as it is read.
        shape = self.expected_video_shape or self.train.video_shape()
        validator = SampleValidator(getattr(dataset, "video_key", "vis_feats"), shape, on_bad_sample=self.on_bad_sample)
        return SimDataLoader(
            ValidatedDataset(dataset, validator, split),
            skip_log=self.skip_log,
            batch_size=int(self.batch_size),
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=int(self.num_workers),
            collate_fn=collate_fn,
            pin_memory=bool(self.pin_memory),
            generator=g,
            persistent_workers=int(self.num_workers) > 0,
            drop_last=False,
        )


def build_data(
    dataset_class_path: str,
    train_split_path: str | None = None,
    val_split_path: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    use_cached_vis_feats: bool = True,
    pin_memory: bool = False,
    dataset_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    val_kwargs: dict[str, Any] | None = None,
    on_bad_sample: str = "error",
    **extra: Any,
) -> SimData:
    """Builder behind every `data` option: `cls(split_path, use_cached_vis_feats, **kwargs)` per split."""
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_sample={on_bad_sample!r}: expected error or skip")
    if int(batch_size) < 1:
        raise ConfigError(f"data.batch_size={batch_size} must be >= 1")
    if int(num_workers) < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0")

    def make(path: str | None, kwargs: dict[str, Any] | None, split: str) -> SimDataset:
        return make_split(dataset_class_path, path, split, use_cached_vis_feats, dataset_kwargs, kwargs)

    return SimData(
        train=make(train_split_path, train_kwargs, "train"),
        val=make(val_split_path, val_kwargs, "val"),
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory),
        extra=dict(extra),
        on_bad_sample=on_bad_sample,
    )


def make_split(
    dataset_class_path: str,
    path: str | None,
    split: str,
    use_cached_vis_feats: bool,
    dataset_kwargs: dict[str, Any] | None = None,
    split_kwargs: dict[str, Any] | None = None,
) -> SimDataset:
    """One split of a `data` option: `cls(path, use_cached_vis_feats, **dataset_kwargs, **split_kwargs)`.

    Raises:
        ConfigError: the class cannot be imported. DataError: the split is empty.
    """
    cls = import_class(dataset_class_path)
    dataset = cls(
        path, use_cached_vis_feats=use_cached_vis_feats, **dict(dataset_kwargs or {}), **dict(split_kwargs or {})
    )
    if len(dataset) == 0:
        raise DataError(f"the {split} split ({path or dataset_class_path}) is empty")
    return dataset


def open_split(data_cfg: Any, split: str, use_cached_vis_feats: bool) -> SimDataset:
    """One split of a composed `data` config, without opening the other one (evaluate.py,
    check_data and export read one split; a missing train split must not stop them).

    Options built by `build_data` (all of conf/data) are opened directly; any other builder is
    instantiated whole and asked for the split.

    Raises:
        ConfigError: a mandatory key unset, or the class cannot be imported. DataError: the split is empty.
    """
    from hydra.utils import instantiate

    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r}: expected train or val")
    if data_cfg.get("_target_") != f"{__name__}.build_data":
        data = instantiate(data_cfg, use_cached_vis_feats=use_cached_vis_feats, _convert_="all")
        return data.split(split)

    def required(key: str) -> Any:
        return select_required(data_cfg, key, prefix="data.")

    def plain(key: str) -> dict[str, Any]:
        value = data_cfg.get(key)
        return to_dict(value)

    return make_split(
        str(required("dataset_class_path")),
        required(f"{split}_split_path"),
        split,
        use_cached_vis_feats,
        plain("dataset_kwargs"),
        plain(f"{split}_kwargs"),
    )
