"""Raw frames: the synthetic generator, the on-disk format, the feature cache, and learning from pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg, run_cmd
from hydra.utils import instantiate

from sim.commands.cache_features import PROGRESS, cache_split
from sim.core import labels as L
from sim.core.errors import ConfigError, DataError
from sim.data.dataset import CachedSplitDataset
from sim.data.synthetic import rules
from sim.data.synthetic_frames import (
    HAZARD_RGB,
    SyntheticFramesDataset,
    generate_frames,
)
from sim.models.vision import build_encoder


def sim_error(excinfo) -> BaseException:
    """The SIM error behind an exception (Hydra's instantiate wraps what a target raises)."""
    exc = excinfo.value
    return exc if isinstance(exc, (ConfigError, DataError)) else exc.__cause__


def without_curves(cfg) -> list:
    """The run's callbacks but the training curves (tested with the run tree; here they would only cost time)."""
    from sim.training.train import TrainingCurves, build_callbacks

    return [cb for cb in build_callbacks(cfg) if not isinstance(cb, TrainingCurves)]


TINY_VISION = {
    "kind": "tiny",
    "name_or_path": "tiny-cnn",
    "pretrained": False,
    "dtype": "float32",
    "init_seed": 0,
    "arch": {"channels": 16, "grid": [2, 2]},
    "preprocessing": {"image_size": 32},
}


def hazard_area(frames: np.ndarray, reason: np.ndarray) -> np.ndarray:
    """[N, F] pixels close to each sample's hazard colour."""
    rgb = HAZARD_RGB[reason][:, None, :, None, None]
    dist = np.abs(frames.astype(np.float32) - rgb).max(axis=2)
    return (dist < 45).sum(axis=(2, 3))


def test_synthetic_frames_draw_the_rules():
    arrays = generate_frames(400, F=6, H=32, W=32, seed=3)
    scenes, frames = arrays["scenes"], arrays["frames"]
    assert frames.shape == (400, 6, 3, 32, 32) and frames.dtype == np.uint8
    # Labels are sim.data.synthetic's rules of the latent scene.
    risk, action = rules(scenes.reason, scenes.level, scenes.side, scenes.fast)
    np.testing.assert_array_equal(arrays["risk_id"], risk)
    np.testing.assert_array_equal(arrays["action_id"], action)
    np.testing.assert_array_equal(arrays["reason_id"], scenes.reason)
    # Closer means bigger: the hazard grows over the window, and a near level fills more than a far one.
    area = hazard_area(frames, scenes.reason)
    assert (area[:, -1] >= area[:, 0]).mean() > 0.95
    mean_area = [area[scenes.level == lv, -1].mean() for lv in range(4)]
    assert mean_area == sorted(mean_area) and mean_area[3] > 4 * mean_area[0]
    # The side is where the hazard is drawn.
    rgb = HAZARD_RGB[scenes.reason][:, None, :, None, None]
    near = (np.abs(frames.astype(np.float32) - rgb).max(axis=2) < 45)[:, -1]  # [N, H, W]
    cols = np.arange(32)[None, None, :]
    centre_x = (near * cols).sum(axis=(1, 2)) / np.maximum(near.sum(axis=(1, 2)), 1)
    assert np.all((centre_x < 16) == (scenes.side < 0))
    # Deterministic by seed; another seed or split gives other scenes.
    again = generate_frames(400, F=6, H=32, W=32, seed=3)
    np.testing.assert_array_equal(again["frames"], frames)
    assert not np.array_equal(generate_frames(400, F=6, H=32, W=32, seed=3, split="val")["risk_id"], arrays["risk_id"])


def test_frames_on_disk_match_memory_and_read_memory_mapped(frames_split):
    ds = CachedSplitDataset(frames_split / "train", use_cached_vis_feats=False)
    mem = SyntheticFramesDataset(num_samples=96, F=4, H=24, W=32, split="train")
    assert isinstance(ds.video, np.memmap) and ds.video_shape() == mem.video_shape() == (4, 3, 24, 32)
    meta = json.loads((frames_split / "train" / "meta.json").read_text())
    assert (meta["H"], meta["W"], meta["F"], meta["format_version"]) == (24, 32, 4, 1)
    batch = ds.__getitems__([5, 2, 7])
    want = mem.__getitems__([5, 2, 7])
    assert batch["frames"].dtype == torch.uint8
    torch.testing.assert_close(batch["frames"], want["frames"])
    torch.testing.assert_close(batch["telemetry"], want["telemetry"])
    for key in ("risk_id", "reason_id", "action_id", "sample_id"):
        assert list(batch[key]) == list(want[key])


def test_bad_frame_splits_are_refused_naming_the_file(frames_split, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(frames_split / "val", bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "H": 99}))
    with pytest.raises(DataError, match=r"frames\.npy: H is 24, meta.json says 99"):
        CachedSplitDataset(bad, use_cached_vis_feats=False)
    (bad / "meta.json").write_text(json.dumps(meta))
    np.save(bad / "frames.npy", np.zeros((40, 4, 3, 24, 32), dtype=np.float32))
    with pytest.raises(DataError, match=r"frames\.npy.*uint8"):
        CachedSplitDataset(bad, use_cached_vis_feats=False)


def test_frame_data_options_instantiate(frames_split):
    cfg = make_cfg(
        "data=frames", f"data.train_split_path={frames_split}/train", f"data.val_split_path={frames_split}/val"
    )
    data = instantiate(cfg.data, use_cached_vis_feats=False, _convert_="all")
    assert next(iter(data.loader("train")))["frames"].shape[1:] == (4, 3, 24, 32)
    cfg = make_cfg("data=synthetic_frames", "data.train_kwargs.num_samples=16", "data.val_kwargs.num_samples=8")
    data = instantiate(cfg.data, use_cached_vis_feats=False, _convert_="all")
    assert next(iter(data.loader("val")))["frames"].shape == (8, cfg.model.F, 3, 32, 32)
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.data, use_cached_vis_feats=True, _convert_="all")
    assert isinstance(sim_error(excinfo), ConfigError) and "vision encoder" in str(sim_error(excinfo))


def cache_cfg(*overrides: str):
    from sim.core.cli import compose

    return compose("cache_features", overrides)


def test_cache_features_command_writes_a_cached_split(frames_split, tmp_path):
    out = tmp_path / "cache"
    args = [
        "vision=tiny",
        "data=frames",
        f"data.train_split_path={frames_split}/train",
        f"data.val_split_path={frames_split}/val",
        f"out={out}",
        "progress_bar=false",
        "data.batch_size=16",
    ]
    r = run_cmd("-m", "sim.cache_features", *args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "frames/s" in r.stdout
    encoder = instantiate(make_cfg("vision=tiny").vision, _convert_="all")
    for split, n in (("train", 96), ("val", 40)):
        cached = CachedSplitDataset(out / split)
        frames = CachedSplitDataset(frames_split / split, use_cached_vis_feats=False)
        assert cached.video.dtype == np.float16 and cached.video.shape == (n, 4, encoder.dv)
        assert cached.meta["encoder"]["spec"]["kind"] == "tiny" and cached.meta["dv"] == encoder.dv
        want = encoder(torch.from_numpy(np.array(frames.video))).numpy()
        np.testing.assert_allclose(np.asarray(cached.video, dtype=np.float32), want, rtol=2**-10, atol=1e-4)
        np.testing.assert_array_equal(cached.telemetry, frames.telemetry)
        assert cached.sample_ids == frames.sample_ids
        for h in L.HEADS:
            np.testing.assert_array_equal(cached.labels[h], frames.labels[h])
        assert not (out / split / PROGRESS).exists() and not (out / split / "weight.npy").exists()
    # Another encoder into the same directory: refused with a message, not a traceback; nothing touched.
    before = (out / "train" / "vis_feats.npy").read_bytes()
    r = run_cmd("-m", "sim.cache_features", *args, "vision.init_seed=7", timeout=300)
    assert r.returncode == 1
    assert "another encoder" in r.stderr and "init_seed" in r.stderr and "Traceback" not in r.stderr
    assert (out / "train" / "vis_feats.npy").read_bytes() == before
    # The same command again has nothing to do; overwrite=true recomputes the same bytes.
    from sim.commands.cache_features import cache_features

    assert all(r["computed"] == 0 for r in cache_features(cache_cfg(*args)).values())
    assert cache_features(cache_cfg(*args, "overwrite=true", "splits=[train]"))["train"]["computed"] == 96
    assert (out / "train" / "vis_feats.npy").read_bytes() == before


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["vision=cached"], ConfigError, "no encoder"),
        (["vision=tiny", "out=null"], ConfigError, "out must be set"),
        (["vision=tiny", "splits=[test]"], ConfigError, "unknown split"),
        (["vision=tiny", "dtype=int8"], ConfigError, "dtype"),
        (["vision=tiny", "data.train_split_path=/no/such/split"], DataError, "split directory not found"),
    ],
)
def test_cache_features_refuses_bad_settings(frames_split, tmp_path, overrides, error, match):
    from sim.commands.cache_features import cache_features

    cfg = cache_cfg(
        "data=frames",
        f"data.train_split_path={frames_split}/train",
        f"data.val_split_path={frames_split}/val",
        f"out={tmp_path / 'c'}",
        "progress_bar=false",
        *overrides,
    )
    with pytest.raises(error, match=match):
        cache_features(cfg)


class Interrupting(torch.nn.Module):
    """Wraps an encoder; counts the samples it encodes and can stop the run after some batches."""

    def __init__(self, encoder, stop_after: int | None = None):
        super().__init__()
        self.encoder, self.stop_after, self.calls, self.samples = encoder, stop_after, 0, 0
        self.dv = encoder.dv

    def identity(self):
        return self.encoder.identity()

    def forward(self, frames):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.samples += frames.shape[0]
        return self.encoder(frames)


def test_cache_resumes_after_an_interruption_without_recomputing(frames_split, tmp_path):
    frames = CachedSplitDataset(frames_split / "train", use_cached_vis_feats=False)
    encoder = build_encoder(**TINY_VISION)
    whole = cache_split(frames, encoder, tmp_path / "whole", batch_size=16, progress_bar=False)
    assert whole["computed"] == 96

    first = Interrupting(encoder, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        cache_split(frames, first, tmp_path / "part", batch_size=16, progress_bar=False)
    progress = json.loads((tmp_path / "part" / PROGRESS).read_text())
    assert progress["rows_done"] == 48 and not (tmp_path / "part" / "meta.json").exists()
    with pytest.raises(DataError, match="unfinished feature cache"):
        CachedSplitDataset(tmp_path / "part")
    # Another encoder may not finish it.
    with pytest.raises(DataError, match="another encoder"):
        cache_split(
            frames,
            build_encoder(**{**TINY_VISION, "init_seed": 1}),
            tmp_path / "part",
            batch_size=16,
            progress_bar=False,
        )

    # Stopped before its first batch: starts over cleanly.
    with pytest.raises(KeyboardInterrupt):
        cache_split(frames, Interrupting(encoder, stop_after=0), tmp_path / "early", batch_size=16, progress_bar=False)
    assert json.loads((tmp_path / "early" / PROGRESS).read_text())["rows_done"] == 0
    assert cache_split(frames, encoder, tmp_path / "early", batch_size=16, progress_bar=False)["computed"] == 96
    assert (tmp_path / "early" / "vis_feats.npy").read_bytes() == (tmp_path / "whole" / "vis_feats.npy").read_bytes()

    second = Interrupting(encoder)
    result = cache_split(frames, second, tmp_path / "part", batch_size=16, progress_bar=False)
    assert second.samples == 96 - 48 and result["computed"] == 48
    for name in ("vis_feats.npy", "telemetry.npy", "risk_id.npy", "reason_id.npy", "action_id.npy", "sample_id.json"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert json.loads((tmp_path / "part" / "meta.json").read_text())["encoder"] == encoder.identity()


def test_cache_refuses_a_directory_it_did_not_write(frames_split, tmp_path):
    import shutil

    target = tmp_path / "split"
    shutil.copytree(frames_split / "val", target)
    frames = CachedSplitDataset(frames_split / "val", use_cached_vis_feats=False)
    with pytest.raises(DataError, match="did not write"):
        cache_split(frames, build_encoder(**TINY_VISION), target, progress_bar=False)
    assert (target / "frames.npy").is_file()


def _setup(tmp_path, name, *overrides):
    from sim.core.run import RunDir
    from sim.training.trainer import Trainer

    trainer = Trainer(
        make_cfg(*TINY, "training.seed=5", "model.F=4", "model.K=2", "data.batch_size=16", *overrides),
        RunDir(tmp_path / name),
    )
    trainer.setup()
    return trainer


def test_training_on_the_cache_sees_what_training_on_frames_sees(frames_split, tmp_path):
    cache_split(
        CachedSplitDataset(frames_split / "train", use_cached_vis_feats=False),
        build_encoder(**TINY_VISION),
        tmp_path / "cache" / "train",
        progress_bar=False,
    )
    cache_split(
        CachedSplitDataset(frames_split / "val", use_cached_vis_feats=False),
        build_encoder(**TINY_VISION),
        tmp_path / "cache" / "val",
        progress_bar=False,
    )
    raw = _setup(
        tmp_path,
        "raw",
        "vision=tiny",
        "data=frames",
        f"data.train_split_path={frames_split}/train",
        f"data.val_split_path={frames_split}/val",
    )
    cached = _setup(
        tmp_path,
        "cached",
        "vision=cached",
        "data=cached",
        f"data.train_split_path={tmp_path}/cache/train",
        f"data.val_split_path={tmp_path}/cache/val",
    )
    assert raw.model.dv == cached.model.dv == 64
    cached.model.load_state_dict(raw.model.trainable_state_dict())
    for a, b in zip(raw.loaders.train, cached.loaders.train, strict=True):
        assert a["sample_id"] == b["sample_id"]  # the same shuffled order
        fa, fb = raw.model.visual_features(a), cached.model.visual_features(b)
        # float16 keeps 11 significant bits: relative error <= 2^-11, plus subnormals near 0.
        torch.testing.assert_close(fb, fa, rtol=2**-10, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(cached.model.prefix(b), raw.model.prefix(a), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(a["telemetry"], b["telemetry"])
        for h in L.HEADS:
            assert torch.equal(a[f"{h}_id"], b[f"{h}_id"])


class ChannelsLastFrames(SyntheticFramesDataset):
    """A user dataset that got the frame layout wrong: [F, H, W, 3]."""

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        return {**sample, "frames": sample["frames"].permute(0, 2, 3, 1)}

    def video_shape(self):
        return tuple(self[0]["frames"].shape)


def test_trainer_refuses_frames_without_an_encoder_and_features_with_one(frames_split, synthetic_split, tmp_path):
    with pytest.raises(
        ConfigError, match=r"vision=tiny encodes raw frames \[F, 3, H, W\] but the data yields \[4, 32, 32, 3\]"
    ):
        _setup(
            tmp_path,
            "a",
            "vision=tiny",
            "data=synthetic_frames",
            "data.dataset_class_path=test_frames.ChannelsLastFrames",
            "data.train_kwargs.num_samples=8",
            "data.val_kwargs.num_samples=8",
        )
    with pytest.raises(DataError, match="has no 'frames'"):
        _setup(
            tmp_path,
            "c",
            "vision=tiny",
            "data=custom",
            "data.dataset_class_path=custom_dataset.NpzRoverDataset",
            f"data.train_split_path={synthetic_split}/train",
            f"data.val_split_path={synthetic_split}/val",
            "model.F=8",
        )
    with pytest.raises(Exception) as excinfo:
        _setup(
            tmp_path,
            "b",
            "vision=cached",
            "data=frames",
            f"data.train_split_path={frames_split}/train",
            f"data.val_split_path={frames_split}/val",
        )
    assert isinstance(sim_error(excinfo), DataError) and "vis_feats.npy is missing" in str(sim_error(excinfo))


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """vision=tiny on data=synthetic_frames with the tiny LLM: a short run that must learn from pixels."""
    from sim.training.train import train

    run_dir = tmp_path_factory.mktemp("pixel_run")
    cfg = make_cfg(
        *TINY,
        "vision=tiny",
        "data=synthetic_frames",
        "data.train_kwargs.num_samples=512",
        "data.val_kwargs.num_samples=256",
        "data.batch_size=32",
        "training.epochs=5",
        "optim.lr=3e-3",
        "checkpoint.monitor=macro_f1",
    )
    # Models this small run several times faster on one thread than on two contended ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, run_dir=run_dir, callbacks=without_curves(cfg)), run_dir, cfg
    finally:
        torch.set_num_threads(threads)


def test_tiny_encoder_learns_the_pixel_rules(pixel_run):
    result, _, cfg = pixel_run
    val = SyntheticFramesDataset(num_samples=256, F=cfg.model.F, split="val")
    labels = val.label_arrays()
    best = result["best"]
    majority = {h: np.bincount(labels[h]).max() / len(labels[h]) for h in L.HEADS}
    # Constant guesses score the majority share in accuracy and at most 1/classes in macro-F1; the hazard
    # type (reason) and its distance (risk, with the speed) are only in the pixels.
    assert best["action_accuracy"] > majority["action"] + 0.25, (best, majority)
    assert best["reason_f1_macro"] > 0.55, best
    assert best["risk_f1_macro"] > 0.45, best


def test_raw_frame_checkpoint_rebuilds_its_encoder(pixel_run):
    from sim.data.dataset import collate_fn
    from sim.models.model import SimV0Model

    result, run_dir, cfg = pixel_run
    model = SimV0Model.from_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert not model.use_cached_vis_feats and model.vision is not None
    assert model.vision.sim_spec["kind"] == "tiny" and model.check_frozen()["vision"]["frozen"] > 0
    val = SyntheticFramesDataset(num_samples=256, F=cfg.model.F, split="val")
    batch = collate_fn([val[i] for i in range(len(val))])
    with torch.no_grad():
        pred = model(batch)["action_logits"].argmax(-1)
    accuracy = (pred == batch["action_id"]).float().mean().item()
    assert accuracy == pytest.approx(result["best"]["action_accuracy"], abs=1e-6)
    out = model.predict_json({k: v[:2] for k, v in batch.items()})
    assert out[0]["action"]["label"] in L.ACTION and out[0]["sample_id"] == batch["sample_id"][0]


def test_bench_frames_reports_both_rates(tmp_path):
    from sim.commands.bench_frames import bench

    r = bench(
        [
            "num_samples=8",
            "num_val=4",
            "H=16",
            "W=16",
            f"out={tmp_path}",
            *TINY,
            "vision=tiny",
            "model.F=4",
            "model.K=2",
            "training.epochs=1",
            "data.batch_size=8",
        ]
    )
    assert (
        r["cache_frames_per_s"] > 0
        and r["train_from_frames_samples_per_s"] > 0
        and r["train_from_cache_samples_per_s"] > 0
    )
    assert json.loads((tmp_path / "bench.json").read_text())["frames"] == [4, 3, 16, 16]
    assert CachedSplitDataset(tmp_path / "cache" / "train").meta["encoder"]["spec"]["kind"] == "tiny"
