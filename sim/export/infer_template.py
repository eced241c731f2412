#!/usr/bin/env python
"""Minimal SIM v0 inference wrapper, written into every run's export/ directory.

It needs the `sim` package (pip install it from the project) and a checkpoint; not the config that
trained it: the checkpoint names the LLM, the dims and the telemetry statistics.

As a script:
    python sim_v0_infer.py window.npz [--checkpoint best.pt] [--risk-high-threshold 0.3 | eval/metrics.json]
where window.npz holds `telemetry` [8] (raw, the model normalizes it) and either `vis_feats` [F, dv]
or `frames` [F, 3, H, W] (a leading batch dimension is accepted too), optionally `sample_id`.
Prints the JSON decision: label, id and class probabilities for risk, reason and action, and the
confidence that the action is right. Without --checkpoint it loads `best.pt` beside this file, else
the run's `checkpoints/best.pt`.

Importable:
    from sim_v0_infer import SimInference
    infer = SimInference("checkpoints/best.pt", risk_high_threshold=0.3)
    decision = infer(telemetry=tel, vis_feats=feats)        # one window -> one dict
    decision = infer.predict_npz("window.npz")

`risk_high_threshold` is the safety operating point `evaluate.py` reports (risk_high_threshold in its
metrics.json): risk is "high" whenever P(high) reaches it, even if another class is more probable.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from sim.core.errors import DataError, SimError
from sim.models.model import SimV0Model
from sim.models.pretrained import is_pretrained_dir
from sim.models.serialization import saved_metadata

HERE = Path(__file__).resolve().parent


def default_checkpoint() -> Path:
    """The exported model this file sits in (config.json + model.safetensors), else best.pt beside it
    (a deployed copy), else the run's checkpoints/best.pt."""
    if is_pretrained_dir(HERE):
        return HERE
    beside = HERE / "best.pt"
    return beside if beside.is_file() else HERE.parent / "checkpoints" / "best.pt"


def read_threshold(value: float | str | Path | None) -> float | None:
    """A threshold given as a number, or as an evaluate.py metrics.json holding `risk_high_threshold`.

    Raises:
        DataError: the file is unreadable or has no threshold; the number is outside [0, 1].
    """
    if value is None:
        return None
    try:
        threshold = float(cast(Any, value))
    except (TypeError, ValueError):
        path = Path(str(value))
        try:
            threshold = json.loads(path.read_text())["risk_high_threshold"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"--risk-high-threshold {value!r}: not a number, nor a metrics.json of evaluate.py "
                f"with risk_high_threshold ({type(exc).__name__}: {exc})"
            ) from None
        if threshold is None:
            raise DataError(f"{path}: risk_high_threshold is null (the split had no 'high' sample)") from None
        threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"risk_high_threshold={threshold} must be a probability in [0, 1]")
    return threshold


class SimInference:
    """Loads a checkpoint once; each call turns one window (or a batch of windows) into decisions.

    Args:
        checkpoint: a SIM checkpoint, or a directory `python -m sim.export` wrote (default: see
            `default_checkpoint`).
        device: "cpu", "cuda", ...
        risk_high_threshold: a probability, or an evaluate.py metrics.json to read it from.
        precision: None computes in the precision the checkpoint was trained and validated in
            (its decisions are the ones evaluate.py reports); "fp32" or "bf16" overrides it.

    Raises:
        CheckpointError: the checkpoint is missing, truncated, corrupt or not a SIM checkpoint.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        risk_high_threshold: float | str | Path | None = None,
        precision: str | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        self.model = SimV0Model.from_checkpoint(self.checkpoint, device=device, precision=precision)
        if risk_high_threshold is None:  # an exported model's calibrated threshold by default
            risk_high_threshold = saved_metadata(self.checkpoint).get("risk_high_threshold")
        self.risk_high_threshold = read_threshold(risk_high_threshold)

    @property
    def video_key(self) -> str:
        return "vis_feats" if self.model.use_cached_vis_feats else "frames"

    def _video_input(self, vis_feats: Any, frames: Any) -> Any:
        """The video input this model reads; DataError when it was not given (naming the other one if it was)."""
        m = self.model
        given = vis_feats if self.video_key == "vis_feats" else frames
        if given is None:
            other = "frames" if self.video_key == "vis_feats" else "vis_feats"
            extra = (
                f" (got {other}, which this checkpoint does not read)"
                if (frames if other == "frames" else vis_feats) is not None
                else ""
            )
            want = f"vis_feats [F={m.F}, dv={m.dv}]" if self.video_key == "vis_feats" else f"frames [F={m.F}, 3, H, W]"
            raise DataError(f"this checkpoint reads {want}{extra}")
        return given

    def batch(
        self, telemetry: Any, vis_feats: Any = None, frames: Any = None, sample_id: str | list[str] | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Check one window (or a batch) and collate it as the model reads it.

        Returns:
            (batch, single): single is True when one window without a batch dimension was given.

        Raises:
            DataError: a missing input, or a shape, dtype or value the model cannot read.
        """
        m = self.model
        video = np.asarray(self._video_input(vis_feats, frames))
        tel = np.asarray(telemetry)
        if tel.dtype.kind not in "fiu" or tel.shape[-1:] != (8,) or tel.ndim not in (1, 2):
            raise DataError(
                f"telemetry has shape {list(tel.shape)} dtype {tel.dtype}, expected [8] (or [B, 8]) numbers "
                "[ax, ay, az, gx, gy, gz, v, w]"
            )
        single = tel.ndim == 1
        shape_given = list(video.shape)
        if single:
            tel, video = tel[None], video[None]
        per_sample = (m.F, m.dv) if self.video_key == "vis_feats" else (m.F, 3)
        if (
            video.ndim != (3 if self.video_key == "vis_feats" else 5)
            or video.shape[1:3] != per_sample
            or video.shape[0] != tel.shape[0]
        ):
            want = f"[F={m.F}, dv={m.dv}]" if self.video_key == "vis_feats" else f"[F={m.F}, 3, H, W]"
            raise DataError(
                f"{self.video_key} has shape {shape_given}, expected {want} for one window "
                f"(or [B, ...] with B = {tel.shape[0]}, the telemetry rows)"
            )
        if video.dtype.kind not in "fiu":
            raise DataError(f"{self.video_key} has dtype {video.dtype}, expected numbers")
        tel_t = torch.from_numpy(np.ascontiguousarray(tel, dtype=np.float32))
        video_t = torch.from_numpy(np.ascontiguousarray(video))
        if self.video_key == "vis_feats":
            video_t = video_t.float()
        for name, t in ((self.video_key, video_t), ("telemetry", tel_t)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{name} holds NaN or inf")
        batch: dict[str, Any] = {self.video_key: video_t, "telemetry": tel_t}
        if sample_id is not None:
            ids = [sample_id] if isinstance(sample_id, str) else [str(s) for s in sample_id]
            if len(ids) == 1 and tel_t.shape[0] > 1:
                ids = [f"{ids[0]}[{i}]" for i in range(tel_t.shape[0])]
            if len(ids) != tel_t.shape[0]:
                raise DataError(f"{len(ids)} sample ids for {tel_t.shape[0]} windows")
            batch["sample_id"] = ids
        return batch, single

    def __call__(
        self, telemetry: Any, vis_feats: Any = None, frames: Any = None, sample_id: str | list[str] | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The decision for one window (a dict) or a batch of windows (a list of dicts)."""
        batch, single = self.batch(telemetry, vis_feats, frames, sample_id)
        out = self.model.predict_json(batch, risk_high_threshold=self.risk_high_threshold)
        return out[0] if single else out

    def predict_npz(self, path: str | Path) -> dict[str, Any] | list[dict[str, Any]]:
        """Decide on the window(s) of an .npz file (sample_id defaults to the file's stem)."""
        arrays = load_window(path)
        return self(
            arrays["telemetry"],
            arrays.get("vis_feats"),
            arrays.get("frames"),
            sample_id=arrays.get("sample_id", Path(path).stem),
        )


def load_window(path: str | Path) -> dict[str, Any]:
    """Arrays of an .npz window: telemetry, vis_feats or frames, optional sample_id (str or list).

    Raises:
        DataError: the file is missing or not a readable .npz, or telemetry is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"window file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz of arrays: {exc}") from None
    if "telemetry" not in arrays:
        raise DataError(
            f"{path} has no 'telemetry' array (found {sorted(arrays)}); expected telemetry [8] and vis_feats or frames"
        )
    if "sample_id" in arrays:
        ids = arrays["sample_id"]
        arrays["sample_id"] = str(ids) if ids.ndim == 0 else [str(s) for s in ids.tolist()]
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("window", help=".npz with telemetry and vis_feats or frames")
    parser.add_argument(
        "--checkpoint", default=None, help="default: best.pt beside this file, else ../checkpoints/best.pt"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "bf16"],
        help="default: the precision the checkpoint was trained and validated in",
    )
    parser.add_argument(
        "--risk-high-threshold",
        default=None,
        help="P(high) threshold, or evaluate.py's metrics.json to read risk_high_threshold from",
    )
    args = parser.parse_args(argv)
    try:
        infer = SimInference(
            args.checkpoint, device=args.device, risk_high_threshold=args.risk_high_threshold, precision=args.precision
        )
        result = infer.predict_npz(args.window)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
