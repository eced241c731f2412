"""Pretrained encoders that run offline (weights inside pip packages) and the ONNX encoder path."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from conftest import decode, make_cfg
from hydra.utils import instantiate

from sim.core.errors import ConfigError, DataError, LLMLoadError
from sim.models.vision import build_encoder, from_spec


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: loading must not reach for a model hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def real_photos() -> torch.Tensor:
    """[4, 3, H, W] uint8: two frames 0.2 s apart of cyclists in a street, and two of a man in a car."""
    from PIL import Image

    bikes = decode("bikes.mp4", every=5, limit=10)
    car = [
        np.asarray(Image.fromarray(f).resize((640, 272))) for f in decode("carphone_pristine.mp4", every=6, limit=12)
    ]
    return torch.from_numpy(np.stack([*bikes, *car])).permute(0, 3, 1, 2).contiguous()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(Fn.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("option, dv", [("efficientnet_lite0", 1280), ("onnx", 384)])
def test_pretrained_encoder_loads_offline_and_tells_real_photos_apart(option, dv, no_network):
    cfg = make_cfg(f"vision={option}")
    enc = instantiate(cfg.vision, _convert_="all")
    assert enc.dv == dv and not any(p.requires_grad for p in enc.parameters())
    spec = enc.sim_spec
    assert spec["name_or_path"].startswith("pkg:") and spec["sha256"] == cfg.vision.sha256
    photos = real_photos()
    feats = enc(photos)
    assert feats.shape == (4, dv) and torch.isfinite(feats).all()
    # The same image gives the same features, from this encoder and from its rebuilt twin.
    torch.testing.assert_close(from_spec(spec)(photos[:1])[0], feats[0], rtol=1e-5, atol=1e-5)
    same_scene = (cosine(feats[0], feats[1]) + cosine(feats[2], feats[3])) / 2
    other_scene = max(cosine(a, b) for a in feats[:2] for b in feats[2:])
    # Cosine distances: another scene is several times farther than the same scene 0.2 s later.
    assert same_scene > 0.8 and 1 - other_scene > 3 * (1 - same_scene), (same_scene, other_scene)


def test_pretrained_weights_are_pinned_and_missing_packages_are_named():
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(make_cfg("vision=efficientnet_lite0").vision)
    spec.pop("_target_")
    # The runtime changes how fast, not what: same identity, same features (to float rounding).
    fast, slow = build_encoder(**{**spec, "runtime": "onnxruntime"}), build_encoder(**{**spec, "runtime": "torch"})
    assert fast.identity() == slow.identity() and list(fast.parameters()) == []
    photo = real_photos()[:1]
    torch.testing.assert_close(fast(photo), slow(photo), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="runtime"):
        build_encoder(**{**spec, "runtime": "tensorrt"})
    with pytest.raises(LLMLoadError, match="SHA-256"):
        build_encoder(**{**spec, "sha256": "0" * 64})
    with pytest.raises(LLMLoadError, match="not installed"):
        build_encoder(**{**spec, "name_or_path": "pkg:no_such_weights_pkg/model.pth"})
    with pytest.raises(ConfigError, match="variant"):
        build_encoder(**{**spec, "arch": {"variant": "efficientnet-lite0", "depth": 3}})
    # Random weights of the same architecture: nothing read, nothing pinned.
    random = build_encoder(**{**spec, "pretrained": False, "sha256": None})
    assert random.dv == 1280 and random.sim_spec["sha256"] is None
    with pytest.raises(ConfigError, match="sha256"):
        build_encoder(kind="tiny", sha256="ab")


# ---- the ONNX path --------------------------------------------------------------------------------
def write_onnx(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A small conv net exported as ONNX by hand: pixels [N,3,16,16] -> conv (stride 2) -> relu ("act",
    [N,4,8,8]) -> global average pool -> flatten ("embedding") -> a 2-way "logits" head (the output).
    Returns its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {
        "conv_w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(size=4).astype(np.float32),
        "head_w": rng.normal(size=(4, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["pixels", "conv_w", "conv_b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head_w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    # IR 8 / opset 17: what any onnxruntime of the last years runs (the newest onnx writes a newer IR).
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return w


ONNX_PRE = {"image_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_onnx_encoder_reads_any_tensor_of_the_graph(tmp_path):
    path = tmp_path / "perception.onnx"
    w = write_onnx(path)
    x = torch.randint(0, 256, (2, 3, 3, 20, 30), dtype=torch.uint8)
    enc = build_encoder(
        kind="onnx",
        name_or_path=str(path),
        pretrained=True,
        preprocessing=ONNX_PRE,
        onnx={"output": "act", "pooling": "avg"},
    )
    assert enc.dv == 4 and list(enc.parameters()) == []
    ref = (
        Fn.conv2d(
            enc.preprocess(x.flatten(0, 1)),
            torch.from_numpy(w["conv_w"]),
            torch.from_numpy(w["conv_b"]),
            stride=2,
            padding=1,
        )
        .relu()
        .mean(dim=(2, 3))
    )
    torch.testing.assert_close(enc(x), ref.reshape(2, 3, 4), rtol=1e-5, atol=1e-5)
    # The graph's own output when none is named; the head after "embedding" runs only then.
    head = build_encoder(kind="onnx", name_or_path=str(path), pretrained=True, preprocessing=ONNX_PRE)
    torch.testing.assert_close(head(x), ref.reshape(2, 3, 4) @ torch.from_numpy(w["head_w"]), rtol=1e-5, atol=1e-5)
    emb = build_encoder(
        kind="onnx", name_or_path=str(path), pretrained=True, preprocessing=ONNX_PRE, onnx={"output": "embedding"}
    )
    torch.testing.assert_close(emb(x), enc(x), rtol=1e-5, atol=1e-5)
    # Its identity is the file's checksum: a rebuild from the spec pins it.
    assert len(enc.sim_spec["sha256"]) == 64 and enc.fingerprint() == enc.sim_spec["sha256"][:16]
    torch.testing.assert_close(from_spec(enc.sim_spec)(x), enc(x))
    write_onnx(path, seed=1)
    with pytest.raises(LLMLoadError, match="SHA-256"):
        from_spec(enc.sim_spec)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"onnx": {"output": "nope"}}, ConfigError, "not a tensor"),
        ({"onnx": {"input": "image"}}, ConfigError, "not an input"),
        ({"onnx": {"pooling": "max"}}, ConfigError, "pooling"),
        ({"onnx": {"outputs": "act"}}, ConfigError, "unknown keys"),
        ({"preprocessing": {"image_size": 32}}, ConfigError, "takes 16"),
        ({"pretrained": False}, ConfigError, "pretrained"),
        ({"dtype": "bfloat16"}, ConfigError, "float32"),
        ({"name_or_path": "missing.onnx"}, LLMLoadError, "no such file"),
    ],
)
def test_bad_onnx_settings_are_refused_naming_the_key(tmp_path, kwargs, error, match):
    path = tmp_path / "m.onnx"
    write_onnx(path)
    spec = {"kind": "onnx", "name_or_path": str(path), "pretrained": True, "preprocessing": ONNX_PRE, **kwargs}
    with pytest.raises(error, match=match):
        build_encoder(**spec)


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(LLMLoadError, match="ONNX"):
        build_encoder(kind="onnx", name_or_path=str(junk), pretrained=True, preprocessing=ONNX_PRE)


def test_cache_and_training_run_through_an_onnx_encoder(frames_split, tmp_path):
    from sim.commands.cache_features import cache_features
    from sim.models.model import SimV0Model
    from sim.training.train import train

    path = tmp_path / "perception.onnx"
    write_onnx(path)
    vision = [
        "vision=onnx",
        f"vision.name_or_path={path}",
        "vision.sha256=null",
        "vision.onnx.input=pixels",
        "vision.onnx.output=act",
        "vision.onnx.pooling=avg",
        "vision.preprocessing.image_size=16",
    ]
    data = ["data=frames", f"data.train_split_path={frames_split}/train", f"data.val_split_path={frames_split}/val"]
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cache_cfg = compose("cache_features", overrides=[*vision, *data, f"out={tmp_path}/cache", "progress_bar=false"])
    cache_features(cache_cfg)
    meta = json.loads((tmp_path / "cache" / "train" / "meta.json").read_text())
    assert meta["dv"] == 4 and meta["encoder"]["spec"]["onnx"]["output"] == "act"
    assert meta["encoder"]["fingerprint"] == meta["encoder"]["spec"]["sha256"][:16]

    run = train(
        make_cfg(
            "llm=tiny",
            "training.progress_bar=false",
            *vision,
            *data,
            "model.F=4",
            "model.K=2",
            "training.epochs=1",
            "training.device=cpu",
        ),
        run_dir=tmp_path / "run",
    )
    ckpt = Path(run["run_dir"]) / "checkpoints" / "best.pt"
    model = SimV0Model.from_checkpoint(ckpt)
    assert model.vision.sim_spec["sha256"] == meta["encoder"]["spec"]["sha256"]
    # A changed file is other features: the cache refuses to mix them, the checkpoint refuses to load.
    write_onnx(path, seed=1)
    with pytest.raises(DataError, match="another encoder"):
        cache_features(cache_cfg)
    with pytest.raises(LLMLoadError, match="SHA-256"):
        SimV0Model.from_checkpoint(ckpt)
