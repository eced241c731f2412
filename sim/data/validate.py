"""Validation of every sample the loader yields, before the model sees it.

Rover data is messy: dropped telemetry, NaN from a sensor glitch, frames of the wrong size, labels
from a buggy labeller, a dataset class that returns the wrong keys. Without a check such input
surfaces as a shape error deep inside the LLM, or as a NaN loss. Here each batch is checked once,
vectorized where it can be (one `isfinite` per tensor, a range check per label), so the check is
cheap enough to stay on; only when a batch fails are the bad samples located and named:

    sample 17 (sample_id 'run3-0017'): telemetry has 2 non-finite values (nan); expected 8 finite numbers

`data.on_bad_sample` decides what happens next: `error` (the default) raises `DataError` naming the
samples; `skip` drops them from the batch, and the loader (`SimDataLoader`) counts them and appends
them to the run's `logs/skipped_samples.txt`. A batch that loses every sample still comes out of the
loader, empty, so the batches stay in step with the sampler.

Two shapes of input are checked: a list of sample dicts (what `__getitem__` yields; checked one by
one, then stacked here) and an already collated batch dict (what a dataset's `__getitems__` yields,
e.g. `CachedSplitDataset`; checked as a whole). Either way the result is a batch of the contract's
types: video float32 (features) or uint8/float32 (frames), telemetry float32 [B, 8], labels int64
[B], weight float32 [B], sample_id a list of B strings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sim.core import labels as L
from sim.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")
LABEL_KEYS = tuple(f"{h}_id" for h in L.HEADS)
TELEMETRY_DIM = len(L.TELEMETRY_FIELDS)
# Rows dropped by the `skip` policy travel with their batch under this key, so that they reach the
# main process even when workers validate (a counter in a worker would be lost).
SKIPPED_KEY = "_skipped_samples"
MAX_LISTED = 5  # bad samples spelled out in one error message
_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FRAME_DTYPES = (torch.uint8, *_FEATURE_DTYPES)
_TEL_SHAPE = torch.Size([len(L.TELEMETRY_FIELDS)])


@dataclass(frozen=True)
class BadSample:
    """One refused sample: where it is, which key is wrong, and what was expected."""

    index: int | None  # position in the dataset (None when unknown)
    sample_id: str | None
    key: str
    problem: str

    def describe(self) -> str:
        where = "sample ?" if self.index is None else f"sample {self.index}"
        if self.sample_id is not None and self.sample_id != str(self.index):
            where += f" (sample_id {self.sample_id!r})"
        return f"{where}: {self.key} {self.problem}"


@dataclass
class Checked:
    """The outcome of checking one batch.

    `batch` holds the rows that could be read and stacked (it may still hold rows that failed a
    value check: NaN, label out of range); `good[i]` says whether row i passed every check.
    `rows` are the rows' dataset indices. `bad` lists every refused sample, once per wrong key.
    """

    batch: dict[str, Any] | None
    rows: list[int | None]
    good: torch.Tensor | None
    bad: list[BadSample] = field(default_factory=list)

    def good_batch(self) -> dict[str, Any] | None:
        """The batch without its bad rows (None when no row is good)."""
        if self.batch is None or self.good is None or not bool(self.good.any()):
            return None
        if bool(self.good.all()):
            return self.batch
        keep = self.good
        idx = keep.nonzero().flatten().tolist()
        return {k: (v[keep] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in self.batch.items()}


def _all_finite(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _shape_str(shape: Sequence[int | None], names: Sequence[str | None] = ()) -> str:
    parts = []
    for i, n in enumerate(shape):
        name = names[i] if i < len(names) else None
        value = "?" if n is None else str(n)
        parts.append(f"{name}={value}" if name else value)
    return "[" + ", ".join(parts) + "]"


def _nonfinite_desc(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    n = int(bad.sum())
    kinds = []
    if bool(torch.isnan(t).any()):
        kinds.append("nan")
    if bool(torch.isposinf(t).any()):
        kinds.append("inf")
    if bool(torch.isneginf(t).any()):
        kinds.append("-inf")
    return f"{n} non-finite value{'s' if n != 1 else ''} ({', '.join(kinds)})"


def _as_tensor(x: Any) -> torch.Tensor | str:
    """A real-valued dense tensor from a tensor, array or nested list; else why not (a str)."""
    if torch.is_tensor(x):
        if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
            return f"is a {x.layout} / {x.dtype} tensor on {x.device.type}"
        t = x.detach()
    elif isinstance(x, (np.ndarray, list, tuple)):
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nesting
            return f"cannot be read as an array ({exc})"
        if arr.dtype.kind not in "biuf":
            return f"has dtype {arr.dtype}"
        try:
            t = torch.from_numpy(np.ascontiguousarray(arr))
        except (TypeError, ValueError) as exc:  # e.g. float128, which torch has no type for
            return f"has dtype {arr.dtype} ({exc})"
    else:
        return f"is a {type(x).__name__}"
    if t.dtype == torch.bool or t.dtype.is_complex:
        return f"has dtype {str(t.dtype).removeprefix('torch.')}"
    return t


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _int_label(x: Any) -> int | None:
    """An integer class id from an int, a NumPy integer or a one-element integer tensor/array."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    if torch.is_tensor(x):
        if (
            x.numel() != 1
            or x.layout != torch.strided
            or x.dtype == torch.bool
            or x.is_floating_point()
            or x.dtype.is_complex
        ):
            return None
        return int(x.reshape(()).item())
    if isinstance(x, np.ndarray):
        if x.size != 1 or x.dtype.kind not in "iu":
            return None
        return int(x.reshape(()))
    return None


def _float_weight(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        if isinstance(x, (int, float, np.integer, np.floating)):
            return float(x)
        if (
            torch.is_tensor(x)
            and x.numel() == 1
            and x.layout == torch.strided
            and x.dtype != torch.bool
            and not x.dtype.is_complex
        ):
            return float(x.reshape(()).item())
        if isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind in "iuf":
            return float(x.reshape(()))
    except OverflowError:  # an int too large for a float
        return math.inf
    return None


def _sample_id(x: Any) -> str | bool | None:
    """str of an id; None when absent; False when it is of a type an id cannot be."""
    if x is None:
        return None
    if isinstance(x, bool):
        return False
    if isinstance(x, (str, int, np.integer)):
        return str(x)
    return False


# ---- one field of one sample: (normalized value, None) or (None, what is wrong) ----------------------
def _check_telemetry(raw: Any) -> tuple[Any, str | None]:
    tel = _as_tensor(raw)
    if isinstance(tel, str):
        return None, f"{tel}; expected {TELEMETRY_DIM} numbers {L.TELEMETRY_FIELDS}"
    if tuple(tel.shape) != (TELEMETRY_DIM,):
        return None, f"has shape {list(tel.shape)}; expected [{TELEMETRY_DIM}] ({', '.join(L.TELEMETRY_FIELDS)})"
    return tel, None


def _check_label(head: str, raw: Any) -> tuple[Any, str | None]:
    value, n = _int_label(raw), L.NUM_CLASSES[head]
    expected = f"expected an integer in 0..{n - 1} ({', '.join(L.LABELS[head])})"
    if value is None:
        return None, f"is {_short(raw)}; {expected}"
    if not 0 <= value < n:
        return None, f"is {value}; {expected}"
    return value, None


def _check_weight(raw: Any) -> tuple[Any, str | None]:
    if raw is None:
        return 1.0, None
    w = _float_weight(raw)
    if w is None or not math.isfinite(w) or w < 0:
        return None, f"is {_short(raw)}; expected a finite float >= 0 (or no weight)"
    return w, None


def _check_sample_id(raw: Any) -> tuple[Any, str | None]:
    sid = _sample_id(raw)
    if sid is False:
        return None, f"is {_short(raw)}; expected a string"
    return sid, None


class _WholeBatch(Exception):
    """A problem of a whole collated batch: every row is refused with it (`SampleValidator.check_batch`)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


def _batch_ids(ids: Any, B: int) -> list[str | None]:
    """A collated batch's sample ids, one per row (None when the batch has none)."""
    if ids is None:
        return [None] * B
    if isinstance(ids, (list, tuple)) and len(ids) == B:
        if all(type(x) is str for x in ids):
            return list(ids)
        normalized = [_sample_id(x) for x in ids]
        if all(x is not False for x in normalized):
            return [x if isinstance(x, str) else None for x in normalized]
    raise _WholeBatch("sample_id", f"is {_short(ids)}; expected a list of {B} strings (one per sample)")


def _batch_rows(batch: Mapping[str, Any], B: int) -> dict[str, torch.Tensor]:
    """Telemetry, labels and weights of a collated batch, each checked for its batch shape."""
    out: dict[str, torch.Tensor] = {}
    tel = _as_tensor(batch["telemetry"])
    if isinstance(tel, str) or tuple(tel.shape) != (B, TELEMETRY_DIM):
        got = tel if isinstance(tel, str) else f"has batch shape {list(tel.shape)}"
        raise _WholeBatch("telemetry", f"{got}; expected [B={B}, {TELEMETRY_DIM}]")
    out["telemetry"] = tel.float()
    for key in LABEL_KEYS:
        lab = _as_tensor(batch[key])
        if isinstance(lab, str) or tuple(lab.shape) != (B,) or lab.is_floating_point():
            got = lab if isinstance(lab, str) else f"has batch shape {list(lab.shape)} dtype {_dtype_name(lab)}"
            raise _WholeBatch(key, f"{got}; expected [B={B}] integers")
        out[key] = lab.long()
    if batch.get("weight") is None:
        out["weight"] = torch.ones(B)
        return out
    w = _as_tensor(batch["weight"])
    if isinstance(w, str) or tuple(w.shape) != (B,):
        got = w if isinstance(w, str) else f"has batch shape {list(w.shape)}"
        raise _WholeBatch("weight", f"{got}; expected [B={B}] floats >= 0")
    out["weight"] = w.float()
    return out


def _shape_matches(shape: Sequence[int], expected: Sequence[int | None]) -> bool:
    pairs = zip(shape, expected, strict=False)  # lengths compared first
    return len(shape) == len(expected) and all(s >= 1 and (e is None or s == e) for s, e in pairs)


def all_plain(samples: Sequence[Any], video_key: str, video_shape: Sequence[int | None]) -> bool:
    """Whether every sample is of the common, well-formed kind (tensors of the expected shape and
    dtype, int labels, str ids), checked with type tests only. Such a batch is stacked at once and
    checked vectorized; any other goes through `check_sample`, one by one, to say what is wrong."""
    vk = video_key
    first = samples[0].get(vk) if type(samples[0]) is dict else None
    if type(first) is not torch.Tensor:
        return False
    shape = first.shape
    if not _shape_matches(shape, video_shape):
        return False
    vdtype = first.dtype
    if vdtype not in (_FEATURE_DTYPES if vk == "vis_feats" else _FRAME_DTYPES):
        return False
    try:
        for s in samples:
            if type(s) is not dict:
                return False
            v, t = s[vk], s["telemetry"]
            if (
                type(v) is not torch.Tensor
                or v.dtype != vdtype
                or v.shape != shape
                or type(t) is not torch.Tensor
                or t.dtype not in _FEATURE_DTYPES
                or t.shape != _TEL_SHAPE
                or type(s["risk_id"]) is not int
                or type(s["reason_id"]) is not int
                or type(s["action_id"]) is not int
                or v.requires_grad
                or t.requires_grad
            ):
                return False
            w, sid = s.get("weight"), s.get("sample_id")
            if (w is not None and type(w) is not float and type(w) is not int) or (
                sid is not None and type(sid) is not str
            ):
                return False
    except (KeyError, TypeError, AttributeError):
        return False
    return True


def check_values(
    batch: dict[str, Any], rows: list[int | None], bad: list[BadSample], video_key: str, expected_video: str
) -> Checked:
    """NaN, inf and label ranges of a stacked batch, vectorized; adds to `bad` and marks the good rows."""
    B = len(rows)
    good = torch.ones(B, dtype=torch.bool)
    ids = batch["sample_id"]
    # One aminmax per tensor on the common path (NaN propagates into it, and it is one pass,
    # several times cheaper than isfinite + all); rows are only located when a check fails.
    video = batch[video_key]
    if video.is_floating_point() and not _all_finite(video):
        for r in (~torch.isfinite(video).reshape(B, -1).all(1)).nonzero().flatten().tolist():
            good[r] = False
            bad.append(
                BadSample(
                    rows[r],
                    ids[r],
                    video_key,
                    f"has {_nonfinite_desc(video[r])}; expected finite {expected_video}",
                )
            )
    tel = batch["telemetry"]
    if not _all_finite(tel):
        for r in (~torch.isfinite(tel).all(1)).nonzero().flatten().tolist():
            good[r] = False
            chans = [L.TELEMETRY_FIELDS[c] for c in (~torch.isfinite(tel[r])).nonzero().flatten().tolist()]
            bad.append(
                BadSample(
                    rows[r],
                    ids[r],
                    "telemetry",
                    f"has {_nonfinite_desc(tel[r])} in {', '.join(chans)}; expected {TELEMETRY_DIM} finite numbers",
                )
            )
    for head in L.HEADS:
        key, n = f"{head}_id", L.NUM_CLASSES[head]
        lab = batch[key]
        lo, hi = torch.aminmax(lab)
        if int(lo) < 0 or int(hi) >= n:
            for r in ((lab < 0) | (lab >= n)).nonzero().flatten().tolist():
                good[r] = False
                bad.append(
                    BadSample(
                        rows[r],
                        ids[r],
                        key,
                        f"is {int(lab[r])}; expected an integer in 0..{n - 1} ({', '.join(L.LABELS[head])})",
                    )
                )
    w = batch["weight"]
    lo, hi = torch.aminmax(w)
    if not (float(lo) >= 0 and float(hi) < math.inf):  # NaN fails the first test
        for r in (~torch.isfinite(w) | (w < 0)).nonzero().flatten().tolist():
            good[r] = False
            bad.append(BadSample(rows[r], ids[r], "weight", f"is {float(w[r])}; expected a finite float >= 0"))
    return Checked(batch, rows, good, bad)


def refusal(bad: Sequence[BadSample], split: str, policy: str) -> DataError:
    """The DataError that names the bad samples (the first few spelled out)."""
    samples = {(b.index, b.sample_id) for b in bad}
    where = f" of the {split} split" if split else ""
    lines = [f"  {b.describe()}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    head = (
        f"bad sample{where}: {bad[0].describe()}"
        if len(bad) == 1
        else f"{len(samples)} bad sample{'s' if len(samples) != 1 else ''} in a batch{where}:\n" + "\n".join(lines)
    )
    return DataError(
        f"{head}\n(data.on_bad_sample={policy}) List every bad sample with "
        "`python -m sim check_data data=...`, fix the data, or skip such samples with data.on_bad_sample=skip."
    )


class SampleValidator:
    """Checks samples and batches against what the model expects.

    Args:
        video_key: "vis_feats" (features [F, dv], floating point) or "frames" ([F, 3, H, W], uint8 or float).
        video_shape: the expected per-sample shape; None entries match any size (the samples of one
            batch must still agree). Default: [F, dv] or [F, 3, H, W] with what is given of F and dv.
        F: frames per sample (model.F), used when `video_shape` is not given.
        dv: feature width, used when `video_shape` is not given (cached features only).
        on_bad_sample: "error" raises DataError naming the bad samples; "skip" drops them.

    Raises:
        ConfigError: an unknown `on_bad_sample` or video key.
    """

    def __init__(
        self,
        video_key: str = "vis_feats",
        video_shape: Sequence[int | None] | None = None,
        F: int | None = None,
        dv: int | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        if on_bad_sample not in POLICIES:
            raise ConfigError(f"data.on_bad_sample={on_bad_sample!r}: expected one of {', '.join(POLICIES)}")
        if video_key not in ("vis_feats", "frames"):
            raise ConfigError(f"video key {video_key!r}: expected vis_feats or frames")
        self.video_key = video_key
        self.on_bad_sample = on_bad_sample
        if video_shape is None:
            video_shape = (F, dv) if video_key == "vis_feats" else (F, 3, None, None)
        self.video_shape = tuple(None if n is None else int(n) for n in video_shape)
        names = ("F", "dv") if video_key == "vis_feats" else ("F", "C", "H", "W")
        self.expected_video = _shape_str(self.video_shape, names if len(self.video_shape) == len(names) else ())
        self.video_dtypes = "floating point" if video_key == "vis_feats" else "uint8 or floating point"
        self.required = (video_key, "telemetry", *LABEL_KEYS)

    # ---- one sample (the __getitem__ path) ---------------------------------------------------------
    def _video_ok(self, t: torch.Tensor) -> str | None:
        if self.video_key == "vis_feats":
            if not t.is_floating_point():
                return f"has dtype {_dtype_name(t)}; expected {self.video_dtypes} {self.expected_video}"
        elif not (t.dtype == torch.uint8 or t.is_floating_point()):
            return f"has dtype {_dtype_name(t)}; expected {self.video_dtypes} {self.expected_video}"
        return None

    def check_sample(self, sample: Any) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
        """Structural checks of one sample dict; values (NaN, inf) are checked once stacked.

        Returns:
            (normalized sample or None, [(key, problem), ...]); the sample is None when it cannot be
            stacked with others (a missing key, a wrong shape or type).
        """
        if not isinstance(sample, Mapping):
            return None, [
                ("sample", f"is a {type(sample).__name__}; expected a dict with keys {', '.join(self.required)}")
            ]
        problems = self._missing_keys(sample)
        if problems:
            return None, problems
        out: dict[str, Any] = {}
        checks = (
            (self.video_key, self._check_video(sample[self.video_key])),
            ("telemetry", _check_telemetry(sample["telemetry"])),
            *((f"{head}_id", _check_label(head, sample[f"{head}_id"])) for head in L.HEADS),
            ("weight", _check_weight(sample.get("weight"))),
            ("sample_id", _check_sample_id(sample.get("sample_id"))),
        )
        for key, (value, problem) in checks:
            if problem is None:
                out[key] = value
            else:
                problems.append((key, problem))
        return (None if problems else out), problems

    def _missing_keys(self, sample: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        for key in self.required:
            if key not in sample:
                other = "frames" if self.video_key == "vis_feats" else "vis_feats"
                hint = (
                    f" (the sample has {other!r}: raw frames and cached features need different vision options)"
                    if (key == self.video_key and other in sample)
                    else ""
                )
                problems.append((key, f"is missing; expected keys {', '.join(self.required)}{hint}"))
        return problems

    def _check_video(self, raw: Any) -> tuple[Any, str | None]:
        video = _as_tensor(raw)
        if isinstance(video, str):
            return None, f"{video}; expected a tensor {self.expected_video} of {self.video_dtypes}"
        why = self._video_ok(video)
        if why:
            return None, why
        if not _shape_matches(video.shape, self.video_shape):
            return None, f"has shape {list(video.shape)}; expected {self.expected_video}"
        return video, None

    def _plain(self, samples: Sequence[Any]) -> bool:
        return all_plain(samples, self.video_key, self.video_shape)

    def check_samples(self, samples: Sequence[Any], indices: Sequence[int | None] | None = None) -> Checked:
        """Check a list of sample dicts, stack the readable ones, then check their values."""
        indices = list(range(len(samples))) if indices is None else list(indices)
        if len(indices) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(indices)} indices")
        if samples and self._plain(samples):
            try:
                batch = {
                    self.video_key: self._video_dtype(torch.stack([s[self.video_key] for s in samples])),
                    "telemetry": torch.stack([s["telemetry"] for s in samples]).float(),
                    **{key: torch.tensor([s[key] for s in samples], dtype=torch.long) for key in LABEL_KEYS},
                    "weight": torch.tensor(
                        [1.0 if s.get("weight") is None else s["weight"] for s in samples], dtype=torch.float32
                    ),
                    "sample_id": [s.get("sample_id") for s in samples],
                }
            except (OverflowError, RuntimeError):  # an int beyond int64: the sample-by-sample path names it
                pass
            else:
                return self._check_values(batch, indices, [])
        bad: list[BadSample] = []
        normalized: list[dict[str, Any]] = []
        rows: list[int | None] = []
        ref_shape: tuple[int, ...] | None = None
        for sample, index in zip(samples, indices, strict=True):
            norm, problems = self.check_sample(sample)
            sid = _sample_id(sample.get("sample_id")) if isinstance(sample, Mapping) else None
            sid = sid if isinstance(sid, str) else None
            if norm is not None:
                shape = tuple(norm[self.video_key].shape)
                if ref_shape is None:
                    ref_shape = shape
                elif shape != ref_shape:  # only possible where the expected shape has free sizes
                    problems = [
                        (
                            self.video_key,
                            f"has shape {list(shape)}; the other samples of its batch have {list(ref_shape)}",
                        )
                    ]
                    norm = None
            bad.extend(BadSample(index, sid, key, problem) for key, problem in problems)
            if norm is not None:
                normalized.append(norm)
                rows.append(index)
        if not normalized:
            return Checked(None, [], None, bad)
        batch = self._stack(normalized)
        return self._check_values(batch, rows, bad)

    def _stack(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        videos = [s[self.video_key] for s in samples]
        if self.video_key == "frames" and len({v.dtype == torch.uint8 for v in videos}) > 1:
            # uint8 frames are 0..255 and float frames 0..1: one batch mixing both gets one scale.
            videos = [v.float() / 255.0 if v.dtype == torch.uint8 else v.float() for v in videos]
        else:
            videos = [self._video_dtype(v) for v in videos]
        return {
            self.video_key: torch.stack(videos),
            "telemetry": torch.stack([s["telemetry"].float() for s in samples]),
            **{key: torch.tensor([s[key] for s in samples], dtype=torch.long) for key in LABEL_KEYS},
            "weight": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
            "sample_id": [s["sample_id"] for s in samples],
        }

    def _video_dtype(self, video: torch.Tensor) -> torch.Tensor:
        # Features go to float32 here, before the finite check: a float64 1e300 becomes inf only then.
        if self.video_key == "vis_feats" or video.dtype != torch.uint8:
            return video.float()
        return video

    # ---- a collated batch (the __getitems__ path) --------------------------------------------------
    def check_batch(self, batch: Any, indices: Sequence[int | None]) -> Checked:
        """Check an already collated batch of the samples at `indices`.

        A problem of the whole batch (a missing key, a wrong shape) refuses every row with that key;
        `check_dataset` then re-reads the samples one by one to say which of them is wrong.
        """
        indices = list(indices)
        B = len(indices)
        if not isinstance(batch, Mapping):
            problem = f"a batch that is a {type(batch).__name__}; expected a dict of stacked tensors"
            return Checked(None, [], None, [BadSample(i, None, "batch", problem) for i in indices])
        id_list: list[str | None] = [None] * B
        try:
            id_list = _batch_ids(batch.get("sample_id"), B)
            missing = [key for key in self.required if key not in batch]
            if missing:
                raise _WholeBatch(missing[0], f"is missing from the batch; expected keys {', '.join(self.required)}")
            out: dict[str, Any] = {self.video_key: self._batch_video(batch[self.video_key], B), **_batch_rows(batch, B)}
        except _WholeBatch as whole:
            return self._whole_batch(indices, id_list, whole.key, whole.problem)
        out["sample_id"] = id_list
        return self._check_values(out, indices, [])

    def _batch_video(self, raw: Any, B: int) -> torch.Tensor:
        video = _as_tensor(raw)
        if isinstance(video, str):
            raise _WholeBatch(self.video_key, f"{video}; expected a tensor {self.expected_video} per sample")
        why = self._video_ok(video)
        if why:
            raise _WholeBatch(self.video_key, why)
        if not _shape_matches(video.shape, (B, *self.video_shape)):
            problem = f"has batch shape {list(video.shape)}; expected [B={B}] + {self.expected_video}"
            raise _WholeBatch(self.video_key, problem)
        return self._video_dtype(video)

    def _whole_batch(self, indices: list[int | None], ids: list[str | None], key: str, problem: str) -> Checked:
        return Checked(None, [], None, [BadSample(i, s, key, problem) for i, s in zip(indices, ids, strict=True)])

    # ---- values (NaN, inf, label ranges), vectorized -----------------------------------------------
    def _check_values(self, batch: dict[str, Any], rows: list[int | None], bad: list[BadSample]) -> Checked:
        return check_values(batch, rows, bad, self.video_key, self.expected_video)

    # ---- a dataset ---------------------------------------------------------------------------------
    def check_dataset(self, dataset: Dataset, indices: Sequence[int]) -> Checked:
        """Read the samples at `indices` and check them (see `read_and_check`)."""
        return read_and_check(self, dataset, indices)

    def refuse(self, bad: Sequence[BadSample], split: str = "") -> DataError:
        """The DataError that names the bad samples (the first few spelled out)."""
        return refusal(bad, split, self.on_bad_sample)

    def apply(self, checked: Checked, split: str = "") -> dict[str, Any]:
        """The batch to train on, per policy: raise on any bad sample, or drop them (listed under
        SKIPPED_KEY; a batch with no good row is just that key)."""
        if checked.bad and self.on_bad_sample == "error":
            raise self.refuse(checked.bad, split)
        batch = checked.good_batch()
        out: dict[str, Any] = {} if batch is None else dict(batch)
        if checked.bad:
            out[SKIPPED_KEY] = [(split, b.index, b.sample_id, b.key, b.problem) for b in checked.bad]
        return out


def _short(x: Any, limit: int = 60) -> str:
    """A value as it reads in a message: tensors by dtype and shape, the rest by repr (cut short)."""
    if torch.is_tensor(x):
        return f"a {_dtype_name(x)} tensor of shape {list(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {list(x.shape)}"
    text = repr(x)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    plain = isinstance(x, (int, float, str)) and not isinstance(x, bool)
    return text if plain else f"{text} ({type(x).__name__})"


class ValidatedDataset(Dataset):
    """A dataset whose batches are read, checked and collated together (what `SimData.loader` uses).

    `__getitems__` knows the batch's indices, so a refused sample is named by its index in the split
    as well as its sample_id; the DataLoader's collate_fn receives the finished batch.
    """

    def __init__(self, dataset: Dataset, validator: SampleValidator, split: str = "") -> None:
        self.dataset = dataset
        self.validator = validator
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.__getitems__([idx])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.validator.apply(self.validator.check_dataset(self.dataset, indices), self.split)


class SkipLog:
    """Samples dropped by `data.on_bad_sample=skip`: counted, logged, and listed in a file.

    Each sample is listed once (per split) however many epochs skip it; `events` counts every skip.
    """

    HEADER = "split\tindex\tsample_id\tkey\tproblem\n"

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.seen: set[tuple[str, int | None, str | None]] = set()
        self.events = 0

    @property
    def count(self) -> int:
        """Distinct samples skipped so far."""
        return len({(s, i, sid) for s, i, sid in self.seen})

    def record(self, entries: Sequence[tuple[str, int | None, str | None, str, str]]) -> None:
        fresh = []
        batch_samples = {(e[0], e[1], e[2]) for e in entries}
        self.events += len(batch_samples)
        for entry in entries:
            if (entry[0], entry[1], entry[2]) not in self.seen:
                fresh.append(entry)
        self.seen.update(batch_samples)
        if not fresh:
            return
        if self.path is not None:
            new_file = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as fh:
                if new_file:
                    fh.write(self.HEADER)
                for split, index, sid, key, problem in fresh:
                    fh.write(
                        f"{split}\t{'' if index is None else index}\t{'' if sid is None else sid}\t{key}\t{problem}\n"
                    )
        first = BadSample(fresh[0][1], fresh[0][2], fresh[0][3], fresh[0][4]).describe()
        log.warning(
            "data.on_bad_sample=skip: skipped %d bad sample(s) of the %s split (%d distinct so far%s); first: %s",
            len({(e[1], e[2]) for e in fresh}),
            fresh[0][0] or "?",
            self.count,
            f", listed in {self.path}" if self.path is not None else "",
            first,
        )


class SimDataLoader(DataLoader):
    """A DataLoader that hands skipped samples to a SkipLog.

    It yields exactly one batch per batch of its sampler, even when `skip` refused every sample of
    one: that batch comes out as an empty dict (falsy) rather than not at all. Consumers that train
    depend on it: each DDP rank must take as many steps as the others (a rank one batch short would
    leave them waiting in the gradient all-reduce), and a resumed run counts its place in the
    epoch's order in sampler batches. Consumers that only evaluate pass over empty batches.
    """

    def __init__(self, *args: Any, skip_log: SkipLog | None = None, **kwargs: Any) -> None:
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        super().__init__(*args, **kwargs)

    def __iter__(self):  # type: ignore[override]
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as exc:
                raise _unwrap_worker_error(exc) from None
            if isinstance(batch, dict):
                skipped = batch.pop(SKIPPED_KEY, None)
                if skipped:
                    self.skip_log.record(skipped)
            yield batch


def _unwrap_worker_error(exc: DataError) -> DataError:
    # A worker's exception reaches the main process as the same type with the worker's traceback
    # in its message; the user needs the message, not the traceback of a worker.
    text = str(exc)
    marker = "DataError: "
    if "Original Traceback" in text and marker in text:
        return DataError(text.split(marker, 1)[1].strip())
    return exc


def telemetry_stats(tel: np.ndarray, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per telemetry channel over the samples whose telemetry is finite.

    A NaN from one glitching sensor must not turn the normalization (and so every sample) into NaN;
    the bad samples themselves are refused or skipped when their batch is read.

    Raises:
        DataError: the array is not [N, 8], or no sample has finite telemetry.
    """
    tel = np.asarray(tel, dtype=np.float64)
    if tel.ndim != 2 or tel.shape[1] != TELEMETRY_DIM:
        raise DataError(f"the {split} split's telemetry has shape {list(tel.shape)}; expected [N, {TELEMETRY_DIM}]")
    finite = np.isfinite(tel).all(1)
    if not finite.any():
        raise DataError(
            f"no sample of the {split} split has finite telemetry; expected {TELEMETRY_DIM} finite numbers per sample"
        )
    if not finite.all():
        log.warning(
            "%d of %d %s samples have non-finite telemetry; the normalization statistics leave them out",
            int((~finite).sum()),
            finite.size,
            split,
        )
        tel = tel[finite]
    return torch.from_numpy(tel.mean(0)).float(), torch.from_numpy(tel.std(0)).float()


def read_and_check(validator: SampleValidator, dataset: Dataset, indices: Sequence[int]) -> Checked:
    """Read the samples at `indices` (a whole batch through `__getitems__` where the dataset has
    it) and check them. A batch read that fails or is malformed as a whole is re-read sample by
    sample, so the message names the samples that are wrong."""
    indices = [int(i) for i in indices]
    whole: Checked | None = None  # a batch from __getitems__ that is malformed as a whole
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        failed = object()
        try:
            data = getitems(indices)
        except Exception:
            data = failed
        if isinstance(data, list) and len(data) == len(indices):  # __getitems__ may return samples
            return validator.check_samples(data, indices)
        if data is not failed:
            whole = validator.check_batch(data, indices)
            if whole.batch is not None:
                return whole
    samples, rows, bad = [], [], []
    for i in indices:
        try:
            samples.append(dataset[i])
            rows.append(i)
        except Exception as exc:
            bad.append(BadSample(i, None, "sample", f"could not be read: {type(exc).__name__}: {exc}"))
    if whole is not None and not samples:
        return whole  # no sample reads alone: the batch's own problem says the most
    checked = validator.check_samples(samples, rows)
    checked.bad = bad + checked.bad
    return checked
