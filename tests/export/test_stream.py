"""The stream runner on real footage: a checkpoint trained on cached EfficientNet-Lite0 features of real
street clips decides on a real clip through that same encoder, writes one decision per tick and an
overlay video, skips and counts bad frames, and matches telemetry by timestamp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clip, decode, make_cfg

from sim.core import labels as L
from sim.core.errors import ConfigError, DataError, LLMLoadError

F, K = 4, 2
SIZE = (144, 176)  # H, W of the carphone clips; the bikes clip is resized to it for the split


def write_split(root: Path, windows: list[np.ndarray], labels: list[tuple[int, int, int]]) -> Path:
    """A raw-frame split (README "Data formats") of real windows [F, H, W, 3]."""
    root.mkdir(parents=True)
    n = len(windows)
    np.save(root / "frames.npy", np.stack(windows).transpose(0, 1, 4, 2, 3).copy())
    rng = np.random.default_rng(0)
    np.save(root / "telemetry.npy", rng.normal(size=(n, 8)).astype(np.float32))
    for h, column in zip(L.HEADS, np.asarray(labels).T, strict=True):
        np.save(root / f"{h}_id.npy", column.astype(np.int64))
    (root / "meta.json").write_text(
        json.dumps({"format_version": 1, "F": F, "H": SIZE[0], "W": SIZE[1], "labels": L.LABELS})
    )
    return root


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """(checkpoint, cache dir): a tiny-LLM model trained on cached EfficientNet-Lite0 features of real
    windows (cyclists in a street: risk high, reason human, action slow; a man in a car: none,
    unknown, continue)."""
    from sim.commands.cache_features import cache_features
    from sim.training.train import train

    tmp = tmp_path_factory.mktemp("real_run")
    bikes = decode("bikes.mp4", every=6, limit=6 * F * 3, size=SIZE)
    car = decode("carphone_pristine.mp4", every=6, limit=6 * F * 3)
    windows = [np.stack(c[i * F : (i + 1) * F]) for c in (bikes, car) for i in range(3)]
    labels = [(3, 0, 1)] * 3 + [(0, 3, 0)] * 3
    pick = {"train": [0, 1, 3, 4], "val": [2, 5]}
    for split, idx in pick.items():
        write_split(tmp / "frames" / split, [windows[i] for i in idx], [labels[i] for i in idx])
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cache_cfg = compose(
            "cache_features",
            overrides=[
                "vision=efficientnet_lite0",
                f"data.train_split_path={tmp}/frames/train",
                f"data.val_split_path={tmp}/frames/val",
                f"out={tmp}/cache",
                "progress_bar=false",
                "device=cpu",
            ],
        )
    cache_features(cache_cfg)
    cfg = make_cfg(
        "llm=tiny",
        "training.progress_bar=false",
        "data=cached",
        f"data.train_split_path={tmp}/cache/train",
        f"data.val_split_path={tmp}/cache/val",
        f"model.F={F}",
        f"model.K={K}",
        "training.epochs=3",
        "data.batch_size=4",
        "llm.dtype=float32",
        "training.amp=false",
        "training.device=cpu",
    )
    run = train(cfg, run_dir=tmp / "run")
    return Path(run["run_dir"]) / "checkpoints" / "best.pt", tmp / "cache"


def stream_cfg(*overrides: str):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("stream", overrides=list(overrides))


def test_checkpoint_trained_on_cached_features_streams_a_real_clip(real_run, tmp_path):
    from sim.export.stream import stream

    ckpt, cache = real_run
    meta = torch.load(ckpt, weights_only=True)["metadata"]
    recorded = meta["vision"]["features_of"]
    assert recorded == json.loads((cache / "train" / "meta.json").read_text())["encoder"]
    assert recorded["spec"]["kind"] == "efficientnet_lite" and len(recorded["spec"]["sha256"]) == 64

    out = tmp_path / "out"
    frames = 45
    summary = stream(
        stream_cfg(
            f"checkpoint={ckpt}",
            f"video={clip('carphone_pristine.mp4')}",
            f"out={out}",
            "stride=2",
            "fps=10",
            f"max_frames={frames}",
        )
    )
    lines = [json.loads(s) for s in (out / "decisions.jsonl").read_text().splitlines()]
    # 30 fps resampled to 10: 15 frames encoded; the first window is full at the 4th, then every 2nd.
    assert summary["frames_in"] == frames and summary["frames_used"] == 15 and summary["frames_refused"] == 0
    ticks = 1 + (15 - F) // 2
    assert len(lines) == summary["decisions"] == ticks
    for line in lines:
        assert {"t", "frame_index", "risk", "reason", "action", "confidence", "latency_ms", "telemetry"} <= set(line)
        assert line["risk"]["label"] in L.LABELS["risk"] and line["telemetry"] == "fallback"
        assert abs(sum(line["risk"]["probs"].values()) - 1) < 1e-4
    assert [x["frame_index"] for x in lines] == sorted(x["frame_index"] for x in lines)
    # The model was taught "a man in a car: nothing to fear, keep going" on this very clip.
    assert lines[-1]["action"]["label"] == "continue"

    import av

    with av.open(str(out / "overlay.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (*SIZE, 3)
    original = decode("carphone_pristine.mp4", limit=frames)
    # Drawn on: the risk bar's rows differ from the clip, the middle of the picture hardly does.
    assert np.abs(decoded[-1][:8].astype(int) - original[-1][:8]).mean() > 30
    assert summary["latency_ms_p50"] > 0 and summary["keeps_up"] in (True, False)


def test_a_corrupt_frame_mid_stream_is_skipped_and_counted(real_run):
    from sim.export.stream import load_runner

    ckpt, _ = real_run
    runner = load_runner(ckpt, stride=1)
    frames = decode("carphone_pristine.mp4", every=3, limit=3 * 8)
    bad = {3: frames[3][:50], 5: None, 6: frames[6].astype(np.float32)}
    decisions = []
    for i, frame in enumerate(frames):
        decisions.append(runner.push(bad.get(i, frame), t=i * 0.1))
    assert runner.refused == 3 and runner.frames_used == len(frames) - 3
    assert set(runner.refused_reasons) == {
        "size 176x50 differs from the stream's 176x144",
        "it could not be decoded",
        "shape [144, 176, 3] dtype float32, expected [H, W, 3] uint8",
    }
    # The window fills from the good frames only and the stream goes on deciding after the bad ones.
    made = [i for i, d in enumerate(decisions) if d is not None]
    assert made == [4, 7] and runner.decisions == 2
    # A timestamp going backwards is refused too; the next good frame decides.
    assert runner.push(frames[0], t=0.2) is None and runner.refused == 4
    assert runner.push(frames[1], t=1.0) is not None


def test_the_file_loop_skips_undecodable_and_broken_frames_in_decisions_and_overlay(real_run, tmp_path):
    import av

    from sim.export.stream import load_runner, read_video, run_stream

    ckpt, _ = real_run
    n = 16

    def frames():
        for index, t, frame in read_video(clip("carphone_pristine.mp4")):
            if index == n:
                return
            # Frame 6 did not decode; frame 9 arrives cut short.
            yield index, t, None if index == 6 else frame[:40] if index == 9 else frame

    summary = run_stream(load_runner(ckpt, stride=2), frames(), tmp_path, rate=30.0)
    assert summary["frames_in"] == n and summary["frames_refused"] == 2 and summary["frames_used"] == n - 2
    assert summary["decisions"] == 1 + (n - 2 - F) // 2 == len((tmp_path / "decisions.jsonl").read_text().splitlines())
    with av.open(str(tmp_path / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == summary["frames_drawn"] == n - 2
    assert json.loads((tmp_path / "summary.json").read_text())["refused_reasons"]


def test_a_raw_frame_checkpoint_streams_through_its_own_encoder(frames_split, tmp_path):
    from sim.export.stream import load_runner
    from sim.training.train import train

    run = train(
        make_cfg(
            "llm=tiny",
            "training.progress_bar=false",
            "vision=tiny",
            "data=frames",
            f"data.train_split_path={frames_split}/train",
            f"data.val_split_path={frames_split}/val",
            f"model.F={F}",
            f"model.K={K}",
            "training.epochs=1",
            "training.device=cpu",
            "llm.dtype=float32",
            "training.amp=false",
        ),
        run_dir=tmp_path / "run",
    )
    runner = load_runner(Path(run["run_dir"]) / "checkpoints" / "best.pt", stride=1)
    assert runner.encoder is runner.model.vision and runner.encoder.sim_spec["kind"] == "tiny"
    decisions = [runner.push(f, t=i / 30) for i, f in enumerate(decode("carphone_pristine.mp4", limit=F + 1))]
    assert [d is not None for d in decisions] == [False] * (F - 1) + [True, True]
    # The same window through the model's own frames path gives the same decision.
    window = torch.from_numpy(np.stack(decode("carphone_pristine.mp4", limit=F + 1)[1:])).permute(0, 3, 1, 2)
    direct = runner.model.predict_json({"frames": window.unsqueeze(0), "telemetry": runner.model.tel_mean[None]})[0]
    assert direct["risk"]["probs"] == pytest.approx(decisions[-1]["risk"]["probs"], abs=1e-5)


def test_telemetry_is_matched_by_timestamp_and_bad_rows_are_skipped(real_run, tmp_path, caplog):
    from sim.export.stream import TelemetryTrack, load_runner

    csv = tmp_path / "tel.csv"
    csv.write_text(
        "t,ax,ay,az,gx,gy,gz,v,w\n0.0,0,0,9.8,0,0,0,1.0,0\n0.5,0,0,9.8,0,0,0,nan,0\n1.0,0,0,9.8,0,0,0,2.0,0.1\n"
    )
    track = TelemetryTrack(csv)
    assert track.skipped == 1 and track.at(-0.1) is None
    assert track.at(0.7)[0][6] == 1.0 and track.at(1.0)[0][6] == 2.0 and track.at(5.0)[1] == 1.0
    with pytest.raises(DataError, match="gz"):
        bad = tmp_path / "bad.csv"
        bad.write_text("t,ax,ay,az,gx,gy,v,w\n0,0,0,0,0,0,0,0\n")
        TelemetryTrack(bad)

    ckpt, _ = real_run
    runner = load_runner(ckpt, stride=1, max_telemetry_age_s=0.25)
    frames = decode("carphone_pristine.mp4", limit=F + 2)
    with caplog.at_level("WARNING"):
        first = [runner.push(f, t=i * 0.1) for i, f in enumerate(frames[:F])][-1]
    assert first["telemetry"] == "fallback" and "mean telemetry" in caplog.text
    assert runner.push(frames[F], t=F * 0.1, telemetry=[0, 0, 9.8, 0, 0, 0, 1.5, 0])["telemetry"] == "live"
    assert runner.push(frames[F + 1], t=1.0)["telemetry"] == "stale"


def test_stream_refuses_a_checkpoint_whose_encoder_weights_changed(real_run, tmp_path):
    from sim.core.checkpoint import load_checkpoint, save_checkpoint
    from sim.export.stream import stream

    ckpt, _ = real_run
    state = load_checkpoint(ckpt)
    state["metadata"]["vision"]["features_of"]["spec"]["sha256"] = "0" * 64
    altered = tmp_path / "altered.pt"
    save_checkpoint(altered, state)
    args = (f"video={clip('carphone_pristine.mp4')}", f"out={tmp_path / 'o'}", "max_frames=2")

    with pytest.raises(LLMLoadError, match="SHA-256"):
        stream(stream_cfg(f"checkpoint={altered}", *args))
    del state["metadata"]["vision"]["features_of"]
    save_checkpoint(altered, state)
    with pytest.raises(ConfigError, match="vision=OPTION"):
        stream(stream_cfg(f"checkpoint={altered}", *args))
    with pytest.raises(DataError, match="video not found"):
        stream(stream_cfg(f"checkpoint={ckpt}", "video=nowhere.mp4", f"out={tmp_path / 'o'}"))


def test_an_exported_model_directory_streams_as_its_checkpoint(real_run, tmp_path):
    """`python -m sim.export` output goes wherever a checkpoint goes: the same decisions, and the
    directory's calibrated threshold applies without being named."""
    from sim.export.artifact import export_artifact
    from sim.export.stream import stream

    ckpt, cache = real_run
    data = ["data=cached", f"data.train_split_path={cache / 'train'}", f"data.val_split_path={cache / 'val'}"]
    from sim.core.cli import compose

    exported = tmp_path / "model"
    export_artifact(compose("export", [f"checkpoint={ckpt}", f"out={exported}", "onnx=false", *data]))
    threshold = json.loads((exported / "config.json").read_text())["risk_high_threshold"]
    runs = {}
    for name, source, extra in (("ckpt", ckpt, [f"risk_high_threshold={threshold}"]), ("dir", exported, [])):
        out = tmp_path / name
        common = [f"video={clip('carphone_pristine.mp4')}", f"out={out}", "stride=2", "fps=10", "max_frames=30"]
        stream(stream_cfg(f"checkpoint={source}", *common, *extra))
        runs[name] = [json.loads(s) for s in (out / "decisions.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in d.items() if k != "latency_ms"} for d in runs["ckpt"]]
    assert strip == [{k: v for k, v in d.items() if k != "latency_ms"} for d in runs["dir"]] and strip
