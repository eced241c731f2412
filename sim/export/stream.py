"""Decide on a video stream: a rolling window of F frames, a decision every `stride` frames.

    python -m sim.stream checkpoint=outputs/.../checkpoints/best.pt video=drive.mp4 \\
        [telemetry=drive.csv] out=DIR [stride=4] [fps=5] [risk_high_threshold=eval/metrics.json]

writes `DIR/decisions.jsonl` (one line per decision: timestamp, frame index, the fields of
`predict_json`, latency), `DIR/overlay.mp4` (every frame with the current decision drawn on it, see
`sim.export.overlay`) and `DIR/summary.json`, and prints whether it keeps up with real time.

One command serves both kinds of checkpoint. A model trained on raw frames runs its own frozen
encoder; a model trained on cached features runs the encoder those features were cached with, which
the checkpoint records (`sim.commands.cache_features` writes it into the cache, training copies it), so the
frames go through exactly that encoder (its weights' checksum is checked).

Each frame is encoded once, when it enters the window; a decision reuses the features of the F
frames in the window. The stream is resampled to the model's frame spacing (`fps`, the rate the
training windows were sampled at; null: every frame is used). Telemetry rows are matched to a
decision by timestamp (the latest row at or before it); without telemetry the model sees the training
set's mean telemetry (the checkpoint's normalization mean), which the log and every decision say.

A frame that cannot be decoded or read (wrong shape or type, a timestamp going backwards, an encoder
failure) is refused, counted and skipped: the stream never stalls on it.

`StreamRunner` is the same loop for a live source: `push(frame, t, telemetry)` returns a decision
when a window is complete.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sim.core import labels as L
from sim.core.cli import CONF_DIR, fail_cleanly
from sim.core.errors import CheckpointError, ConfigError, DataError
from sim.core.precision import resolve_device
from sim.export.infer_template import read_threshold
from sim.export.overlay import OverlayPainter, OverlayWriter
from sim.models.model import SimV0Model
from sim.models.serialization import saved_metadata
from sim.models.vision import FrozenVisionEncoder, describe, from_spec

log = logging.getLogger(__name__)

TIME_KEYS = ("t", "timestamp", "time")


# ---- the encoder a checkpoint decides through ----------------------------------------------------
def stream_encoder(
    model: SimV0Model,
    meta: dict[str, Any],
    vision: FrozenVisionEncoder | None = None,
    device: str | torch.device = "cpu",
) -> FrozenVisionEncoder:
    """The encoder that turns frames into the features `model` was trained on.

    Args:
        vision: an encoder to use when a cached-feature checkpoint has no record of its encoder
            (features cached outside SIM); refused when it disagrees with a record.

    Raises:
        CheckpointError: the recorded encoder's weights differ from the installed ones.
        ConfigError: no encoder is known, or the given one differs from the record or from dv.
    """
    if not model.use_cached_vis_feats:
        if vision is not None:
            raise ConfigError("this checkpoint was trained on raw frames through its own encoder; drop vision=...")
        return model.vision
    record = (meta.get("vision") or {}).get("features_of")
    if record:
        encoder = from_spec(record["spec"], device=device)
        if encoder is None:
            raise CheckpointError(f"the checkpoint records cached features of {record['spec']}, not an encoder")
        if encoder.fingerprint() != record.get("fingerprint"):
            raise CheckpointError(
                f"the features this checkpoint was trained on came from {describe(record['spec'])} with weights "
                f"fingerprinted {record.get('fingerprint')}, but the same spec builds {encoder.fingerprint()} here: "
                "other weights would give other features"
            )
        if vision is not None and vision.identity() != record:
            raise ConfigError(
                f"vision={describe(vision.sim_spec)} is not the encoder this checkpoint's features came "
                f"from ({describe(record['spec'])}); drop vision=... and the recorded one is used"
            )
    elif vision is not None:
        log.warning(
            "the checkpoint does not record which encoder cached its features; using %s as told "
            "(decisions are meaningless if that is not the one)",
            describe(vision.sim_spec),
        )
        encoder = vision
    else:
        raise ConfigError(
            "this checkpoint was trained on cached features without a record of their encoder "
            "(cached outside `python -m sim.commands.cache_features`, or before it recorded one); "
            "name the encoder that cached them: vision=OPTION"
        )
    if encoder.dv != model.dv:
        raise ConfigError(
            f"the encoder {describe(encoder.sim_spec)} gives {encoder.dv} features, the model reads {model.dv}"
        )
    return encoder


# ---- telemetry -----------------------------------------------------------------------------------
class TelemetryTrack:
    """Telemetry rows by timestamp, from a CSV with a time column (t, timestamp or time, in seconds on
    the video's clock) and the eight fields ax, ay, az, gx, gy, gz, v, w.

    Raises:
        DataError: the file is missing, or lacks a column (named); rows with a non-numeric or
            non-finite value are skipped with a warning naming the line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"telemetry file not found: {self.path}")
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            time_key = next((k for k in TIME_KEYS if k in columns), None)
            missing = [k for k in L.TELEMETRY_FIELDS if k not in columns]
            if time_key is None or missing:
                raise DataError(
                    f"{self.path}: columns {columns}; expected a time column ({' or '.join(TIME_KEYS)}) "
                    f"and {', '.join(L.TELEMETRY_FIELDS)}" + (f" (missing {missing})" if missing else "")
                )
            rows: list[tuple[float, np.ndarray]] = []
            self.skipped = 0
            for line, raw in enumerate(reader, start=2):
                raw = {k.strip(): v for k, v in raw.items() if k is not None}
                try:
                    t = float(raw[time_key])
                    values = np.array([float(raw[k]) for k in L.TELEMETRY_FIELDS], dtype=np.float32)
                except (TypeError, ValueError):
                    values, t = None, math.nan
                if values is None or not math.isfinite(t) or not np.isfinite(values).all():
                    self.skipped += 1
                    log.warning(
                        "%s line %d: the time and the 8 fields are not all finite numbers; row skipped", self.path, line
                    )
                    continue
                rows.append((t, values))
        rows.sort(key=lambda r: r[0])
        self.times = [t for t, _ in rows]
        self.values = [v for _, v in rows]
        if not rows:
            raise DataError(f"{self.path} has no usable telemetry row")

    def at(self, t: float) -> tuple[np.ndarray, float] | None:
        """The latest row at or before `t` and its timestamp (None before the first row)."""
        i = bisect.bisect_right(self.times, t + 1e-9) - 1
        return None if i < 0 else (self.values[i], self.times[i])


# ---- the runner ----------------------------------------------------------------------------------
class StreamRunner:
    """Turns a stream of frames (and telemetry rows) into decisions.

    Args:
        model: a trained SimV0Model (computes in its own precision).
        encoder: the frozen encoder of its features (`stream_encoder`).
        stride: decide every `stride` frames (after resampling) once the window is full.
        fps: the model's frame rate; the stream is resampled to it (None: every frame is used).
        risk_high_threshold: P(high) at which risk is "high" (evaluate.py's calibrated operating point);
            None: the arg-max.
        max_telemetry_age_s: a row older than this is stale; the decision then says so and uses it.

    Counters: `frames_in`, `frames_used`, `refused` (and `refused_reasons`), `decisions`, `latencies_ms`;
    `accepted` says whether the last frame pushed was taken (False: refused).
    """

    def __init__(
        self,
        model: SimV0Model,
        encoder: FrozenVisionEncoder,
        stride: int = 1,
        fps: float | None = None,
        risk_high_threshold: float | None = None,
        max_telemetry_age_s: float = 1.0,
    ) -> None:
        if int(stride) < 1:
            raise ConfigError(f"stride={stride} must be >= 1")
        if fps is not None and not float(fps) > 0:
            raise ConfigError(f"fps={fps} must be > 0 (or null: use every frame)")
        self.model = model.eval()
        self.encoder = encoder
        self.F = model.F
        self.stride = int(stride)
        self.spacing = None if fps is None else 1.0 / float(fps)
        self.threshold = risk_high_threshold
        self.max_age = float(max_telemetry_age_s)
        self.window: deque[tuple[torch.Tensor, float]] = deque(maxlen=self.F)
        self.next_t: float | None = None
        self.last_t: float | None = None
        self.shape: tuple[int, ...] | None = None
        self.since_decision = 0
        self.telemetry: tuple[np.ndarray, float] | None = None
        self.fallback = model.tel_mean.detach().cpu().numpy().astype(np.float32)
        self.warned_fallback = False
        self.frames_in = self.frames_used = self.refused = self.decisions = 0
        self.refused_reasons: dict[str, int] = {}
        self.latencies_ms: list[float] = []
        self.accepted = False

    # A refused frame is counted and logged, never raised: a live stream must go on.
    def _refuse(self, index: int, reason: str) -> None:
        self.accepted = False
        self.refused += 1
        self.refused_reasons[reason] = self.refused_reasons.get(reason, 0) + 1
        log.warning("frame %d refused (%s); skipped", index, reason)

    def _check(self, frame: Any, t: float) -> np.ndarray | str:
        """The frame as `[H, W, 3]` uint8, or why it is refused."""
        if frame is None:
            return "it could not be decoded"
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            return f"timestamp {t!r} is not a finite number"
        if self.last_t is not None and t < self.last_t:
            return f"timestamp {t:.3f}s goes back from {self.last_t:.3f}s"
        try:
            arr = np.asarray(frame)
        except Exception as exc:
            return f"not an array ({type(exc).__name__})"
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 2:
            return f"shape {list(arr.shape)} dtype {arr.dtype}, expected [H, W, 3] uint8"
        if self.shape is not None and arr.shape != self.shape:
            return f"size {arr.shape[1]}x{arr.shape[0]} differs from the stream's {self.shape[1]}x{self.shape[0]}"
        return arr

    def set_telemetry(self, row: Sequence[float] | np.ndarray, t: float) -> bool:
        """Hold a telemetry row (8 values) measured at time `t`; False (and a warning) for a bad row."""
        values = np.asarray(row, dtype=np.float32).reshape(-1)
        if values.shape != (8,) or not np.isfinite(values).all():
            log.warning(
                "telemetry row at %.3fs refused: expected 8 finite values (%s), got %s",
                t,
                ", ".join(L.TELEMETRY_FIELDS),
                values.tolist(),
            )
            return False
        self.telemetry = (values, float(t))
        return True

    def _telemetry_at(self, t: float) -> tuple[np.ndarray, str]:
        if self.telemetry is None:
            if not self.warned_fallback:
                log.warning(
                    "no telemetry: deciding with the training set's mean telemetry (the checkpoint's "
                    "normalization mean, i.e. average motion); decisions say telemetry=fallback"
                )
                self.warned_fallback = True
            return self.fallback, "fallback"
        values, at = self.telemetry
        return values, "live" if t - at <= self.max_age else "stale"

    def push(
        self, frame: Any, t: float, telemetry: Sequence[float] | np.ndarray | None = None, index: int | None = None
    ) -> dict[str, Any] | None:
        """Take one frame (`[H, W, 3]` uint8 RGB) at stream time `t` seconds, with the telemetry row
        measured with it if there is one.

        Returns:
            A decision when this frame completes a window on a tick, else None: {"t", "frame_index",
            "window_start_t", "risk", "reason", "action", "confidence", "latency_ms", "telemetry"}.
        """
        start = time.perf_counter()
        index = self.frames_in if index is None else int(index)
        self.frames_in += 1
        if telemetry is not None:
            self.set_telemetry(telemetry, t)
        arr = self._check(frame, t)
        if isinstance(arr, str):
            self._refuse(index, arr)
            return None
        t = float(t)
        copies = self._copies(t)
        self.last_t = t
        if copies == 0:
            # Between two samples of the model's rate: a good frame (drawn on), not encoded.
            self.accepted = True
            return None
        try:
            feats = self.encoder(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0))[0]
            if not torch.isfinite(feats).all():
                raise ValueError("non-finite features")
        except Exception as exc:
            self._refuse(index, f"encoder failed: {type(exc).__name__}: {exc}")
            return None
        self.shape = arr.shape
        self.accepted = True
        self.frames_used += 1
        for _ in range(copies):
            self.window.append((feats, t))
        self.since_decision += copies
        if len(self.window) < self.F or (self.decisions and self.since_decision < self.stride):
            return None
        self.since_decision = 0
        return self._decide(t, index, start)

    def _copies(self, t: float) -> int:
        """How many window slots this frame fills after resampling to the model's spacing: 0 between
        samples, 1 on one, more when the stream is slower than the model (the frame is repeated)."""
        if self.spacing is None:
            return 1
        if self.next_t is None:
            self.next_t = t
        if t + 1e-6 < self.next_t:
            return 0
        n = math.floor((t - self.next_t) / self.spacing + 1e-6) + 1
        self.next_t += n * self.spacing
        return min(n, self.F)

    def _decide(self, t: float, index: int, start: float) -> dict[str, Any]:
        tel, source = self._telemetry_at(t)
        feats = torch.stack([f for f, _ in self.window]).unsqueeze(0)
        batch = {"vis_feats": feats, "telemetry": torch.from_numpy(tel).unsqueeze(0), "sample_id": [f"frame{index}"]}
        out = self.model.predict_json(batch, risk_high_threshold=self.threshold)[0]
        latency = (time.perf_counter() - start) * 1000.0
        self.decisions += 1
        self.latencies_ms.append(latency)
        out.pop("sample_id", None)
        return {
            "t": round(t, 4),
            "frame_index": index,
            "window_start_t": round(self.window[0][1], 4),
            **out,
            "latency_ms": round(latency, 2),
            "telemetry": source,
        }

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        return {
            "frames_in": self.frames_in,
            "frames_used": self.frames_used,
            "frames_refused": self.refused,
            "refused_reasons": dict(self.refused_reasons),
            "decisions": self.decisions,
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_ms_p90": float(np.percentile(lat, 90)) if lat.size else None,
        }


# ---- video files ---------------------------------------------------------------------------------
def video_info(path: str | Path) -> dict[str, Any]:
    """{"rate", "width", "height", "frames"} of a video's first stream.

    Raises:
        DataError: the file is missing or has no video stream PyAV can open.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path} has no video stream")
            s = container.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0) or 25.0
            return {"rate": rate, "width": s.width, "height": s.height, "frames": int(s.frames or 0)}
    except av.error.FFmpegError as exc:
        raise DataError(f"{path} is not a video PyAV can read: {exc}") from exc


def read_video(path: str | Path) -> Iterator[tuple[int, float, np.ndarray | None]]:
    """(index, t seconds, RGB frame) per decoded frame; a packet that fails to decode yields
    (index, t, None) so the caller counts it, and decoding goes on with the next packet."""
    import av

    rate = video_info(path)["rate"]
    index = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                log.warning("%s: a packet at %s does not decode (%s)", path, packet.pts, exc)
                yield index, index / rate, None
                index += 1
                continue
            for frame in frames:
                t = float(frame.time) if frame.time is not None else index / rate
                yield index, t, frame.to_ndarray(format="rgb24")
                index += 1


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def stream_summary(runner: StreamRunner, drawn: int, wall: float, duration: float, rate: float) -> dict[str, Any]:
    """The runner's counters with the wall time, the stream's duration, the rates and whether it kept up."""
    return {
        **runner.summary(),
        "frames_drawn": drawn,
        "wall_s": round(wall, 3),
        "stream_s": round(duration, 3),
        "stream_fps": rate,
        "processed_fps": round(runner.frames_in / wall, 2) if wall > 0 else None,
        "decisions_per_s": round(runner.decisions / wall, 3) if wall > 0 else None,
        "decisions_per_stream_s": round(runner.decisions / duration, 3) if duration > 0 else None,
        "keeps_up": bool(wall <= duration) if duration > 0 else None,
    }


def run_stream(
    runner: StreamRunner,
    frames: Iterable[tuple[int, float, Any]],
    out: str | Path,
    rate: float,
    telemetry: TelemetryTrack | None = None,
    overlay: bool = True,
) -> dict[str, Any]:
    """Feed `frames` ((index, t, RGB array or None)) through `runner`, writing decisions.jsonl,
    overlay.mp4 (when `overlay`) and summary.json into `out`.

    Returns:
        The summary: the runner's counters, wall time, stream duration, the rates and `keeps_up`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    painter = writer = None
    current: dict[str, Any] | None = None
    first_t = last_t = None
    t0 = time.perf_counter()
    with (out / "decisions.jsonl").open("w") as decisions:
        try:
            for index, t, frame in frames:
                row = telemetry.at(t) if telemetry is not None else None
                if row is not None and (runner.telemetry is None or runner.telemetry[1] != row[1]):
                    runner.set_telemetry(row[0], row[1])
                decision = runner.push(frame, t, index=index)
                if not runner.accepted:
                    continue  # refused: neither decided on nor drawn
                first_t = t if first_t is None else first_t
                last_t = t
                if decision is not None:
                    decisions.write(json.dumps(decision) + "\n")
                    current = decision
                    if painter is not None:
                        painter.add(decision)
                if overlay:
                    if writer is None:
                        assert runner.shape is not None, "a frame was accepted"
                        h, w = runner.shape[:2]
                        painter, writer = OverlayPainter(w, h), OverlayWriter(out / "overlay.mp4", w, h, rate)
                        if current is not None:
                            painter.add(current)
                    status = f"filling the window: {len(runner.window)}/{runner.F} frames"
                    writer.write(cast(OverlayPainter, painter).draw(np.asarray(frame), current, status))
        finally:
            if writer is not None:
                writer.close()
    wall = time.perf_counter() - t0
    duration = (last_t - first_t + 1.0 / rate) if first_t is not None and last_t is not None else 0.0
    summary = stream_summary(runner, writer.frames if writer is not None else 0, wall, duration, rate)
    if telemetry is not None:
        summary["telemetry_rows_skipped"] = telemetry.skipped
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def report(summary: dict[str, Any]) -> str:
    """The summary as a few lines for a person."""
    verdict = {True: "keeps up with real time", False: "falls behind real time", None: "nothing decoded"}[
        summary["keeps_up"]
    ]
    return (
        f"{summary['frames_in']} frames ({summary['frames_used']} used after resampling, {summary['frames_refused']} "
        f"refused) in {summary['wall_s']:.2f}s for {summary['stream_s']:.2f}s of video: {verdict} "
        f"({summary['processed_fps']} frames/s processed vs the stream's {summary['stream_fps']:.2f})\n"
        f"{summary['decisions']} decisions: {summary['decisions_per_s']}/s achieved vs "
        f"{summary['decisions_per_stream_s']}/s the stream asks for; "
        f"latency p50 {_percent(summary['latency_ms_p50'])} ms, p90 {_percent(summary['latency_ms_p90'])} ms"
    )


# ---- the command ---------------------------------------------------------------------------------
def load_runner(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    vision: FrozenVisionEncoder | None = None,
    stride: int = 1,
    fps: float | None = None,
    risk_high_threshold: float | str | Path | None = None,
    max_telemetry_age_s: float = 1.0,
) -> StreamRunner:
    """A StreamRunner for a checkpoint: its model in its precision, the encoder of its features, and
    the high-risk threshold (a number, or evaluate.py's metrics.json)."""
    model = SimV0Model.from_checkpoint(checkpoint, device=device, precision=precision)
    meta = saved_metadata(checkpoint)
    if risk_high_threshold is None:  # an exported model's calibrated threshold by default
        risk_high_threshold = meta.get("risk_high_threshold")
    encoder = stream_encoder(model, meta, vision, device)
    threshold = read_threshold(risk_high_threshold)
    log.info(
        "stream: %s (F=%d, precision %s), encoder %s, stride %d, fps %s, risk 'high' at %s",
        checkpoint,
        model.F,
        model.precision.name,
        describe(encoder.sim_spec),
        stride,
        fps or "every frame",
        f"P(high) >= {threshold}" if threshold is not None else "the arg-max (no risk_high_threshold given)",
    )
    return StreamRunner(
        model, encoder, stride=stride, fps=fps, risk_high_threshold=threshold, max_telemetry_age_s=max_telemetry_age_s
    )


def stream(cfg: DictConfig) -> dict[str, Any]:
    """Run the stream command a composed `conf/stream.yaml` describes; returns the summary.

    Raises:
        ConfigError: a required key unset. DataError: an unreadable video or telemetry file.
        CheckpointError, LLMLoadError: see `SimV0Model.from_checkpoint` and `stream_encoder`.
    """
    for key in ("checkpoint", "video", "out"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ConfigError(f"{key} must be set: python -m sim.stream checkpoint=PATH video=FILE out=DIR")
    device = resolve_device(cfg.device)
    if cfg.get("threads"):
        # Before any encoder is built: onnxruntime sessions take torch's thread count.
        torch.set_num_threads(int(cfg.threads))
    vision = None
    if cfg.get("vision") is not None:
        vision = instantiate(cfg.vision, _convert_="all")
    info = video_info(cfg.video)
    runner = load_runner(
        cfg.checkpoint,
        device,
        cfg.precision,
        vision,
        int(cfg.stride),
        cfg.fps,
        cfg.risk_high_threshold,
        float(cfg.max_telemetry_age_s),
    )
    # Without a file the runner warns once and falls back to the training set's mean telemetry.
    telemetry = TelemetryTrack(cfg.telemetry) if cfg.telemetry else None
    frames = read_video(cfg.video)
    if cfg.max_frames:
        frames = (f for f in frames if f[0] < int(cfg.max_frames))
    summary = run_stream(runner, frames, cfg.out, info["rate"], telemetry, bool(cfg.overlay))
    log.info(
        "wrote %s",
        ", ".join(
            str(Path(cfg.out) / n)
            for n in ("decisions.jsonl", "overlay.mp4", "summary.json")
            if (Path(cfg.out) / n).exists()
        ),
    )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="stream")
def main(cfg: DictConfig) -> None:
    with fail_cleanly():
        summary = stream(cfg)
    print(report(summary))


if __name__ == "__main__":
    main()
