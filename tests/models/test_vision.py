"""Frozen vision encoders: shapes, preprocessing, freezing, seeded rebuilds, every option's architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg
from hydra.utils import instantiate

from sim.core.errors import ConfigError, LLMLoadError
from sim.models.vision import FrozenVisionEncoder, build_encoder, from_spec

TINY_SPEC = {
    "kind": "tiny",
    "name_or_path": "tiny-cnn",
    "pretrained": False,
    "dtype": "float32",
    "init_seed": 0,
    "arch": {"channels": 8, "grid": [2, 2]},
    "preprocessing": {"image_size": 32},
}


def frames(B=2, F=3, H=24, W=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, F, 3, H, W), generator=g, dtype=torch.uint8)


def test_tiny_encoder_maps_frames_to_features_and_is_frozen():
    enc = build_encoder(**TINY_SPEC)
    assert isinstance(enc, FrozenVisionEncoder) and enc.dv == 8 * 2 * 2
    x = frames()
    y = enc(x)
    assert y.shape == (2, 3, enc.dv) and y.dtype == torch.float32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules()), "a frozen encoder never trains"
    # uint8 frames are scaled to [0, 1] inside; float frames are taken as already scaled.
    torch.testing.assert_close(enc(x.float() / 255.0), y)
    # A single frame batch [N, 3, H, W] gives [N, dv], the same features as inside a clip.
    torch.testing.assert_close(enc(x[:, 1]), y[:, 1])
    # Samples do not leak into each other, and the frame chunking does not change results.
    torch.testing.assert_close(enc(x[1:]), y[1:])
    chunked = build_encoder(**{**TINY_SPEC, "frame_batch_size": 2})
    torch.testing.assert_close(chunked(x), y)


def test_preprocessing_resizes_and_normalizes_inside():
    enc = build_encoder(
        **{**TINY_SPEC, "preprocessing": {"image_size": [16, 20], "mean": [0.2, 0.4, 0.6], "std": [0.5, 0.25, 0.1]}}
    )
    x = torch.full((1, 3, 48, 80), 255, dtype=torch.uint8)
    p = enc.preprocess(x)
    assert p.shape == (1, 3, 16, 20)
    torch.testing.assert_close(p[0, :, 0, 0], torch.tensor([(1 - 0.2) / 0.5, (1 - 0.4) / 0.25, (1 - 0.6) / 0.1]))
    crop = build_encoder(**{**TINY_SPEC, "preprocessing": {"image_size": 16, "resize": "center_crop"}})
    assert crop.preprocess(x).shape == (1, 3, 16, 16)


def test_seed_is_the_identity_of_a_random_encoder():
    a, b = build_encoder(**TINY_SPEC), build_encoder(**TINY_SPEC)
    c = build_encoder(**{**TINY_SPEC, "init_seed": 1})
    x = frames()
    torch.testing.assert_close(a(x), b(x))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not torch.allclose(a(x), c(x))
    # The spec a checkpoint stores rebuilds the same encoder; building does not touch the global RNG.
    state = torch.get_rng_state()
    rebuilt = from_spec(a.sim_spec)
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(rebuilt(x), a(x))
    assert from_spec({"kind": "cached"}) is None and from_spec(None) is None


@pytest.mark.parametrize(
    "option, dv, small",
    [
        ("clip_vit_b32", 768, {"num_hidden_layers": 1}),
        ("siglip_base", 768, {"num_hidden_layers": 1}),
        ("dinov2_small", 384, {"num_hidden_layers": 1}),
        ("resnet18", 512, {"depths": [1, 1, 1, 1]}),
        ("tiny", 64, {}),
    ],
)
def test_each_option_builds_its_architecture_offline(option, dv, small):
    cfg = make_cfg(f"vision={option}", "vision.pretrained=false")
    assert cfg.vision._target_ == "sim.models.vision.build_encoder"
    # Fewer layers keep this quick; the width (dv) is what SIM reads and is the option's own.
    enc = instantiate(cfg.vision, arch={**cfg.vision.arch, **small}, _convert_="all")
    assert enc.dv == dv
    assert not any(p.requires_grad for p in enc.parameters())
    y = enc(frames(B=1, F=2, H=30, W=50))
    assert y.shape == (1, 2, dv) and torch.isfinite(y).all()
    assert enc.preprocess(frames(B=1, F=1)[0]).shape[-2:] == tuple([cfg.vision.preprocessing.image_size] * 2)


def test_pretrained_loads_a_local_directory(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    arch = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(3)
    CLIPVisionModel(CLIPVisionConfig(**arch)).save_pretrained(tmp_path / "clip")
    enc = build_encoder(
        kind="clip", name_or_path=str(tmp_path / "clip"), pretrained=True, preprocessing={"image_size": 32}
    )
    random = build_encoder(kind="clip", pretrained=False, arch=arch, preprocessing={"image_size": 32})
    assert enc.dv == random.dv == 32
    x = frames()
    assert enc(x).shape == (2, 3, 32) and not torch.allclose(enc(x), random(x))
    torch.testing.assert_close(from_spec(enc.sim_spec)(x), enc(x))


def test_unreachable_pretrained_encoder_says_how_to_run_offline(tmp_path):
    with pytest.raises(LLMLoadError, match=r"vision\.pretrained=false"):
        build_encoder(kind="clip", name_or_path="no-such-org/no-such-clip", pretrained=True)
    with pytest.raises(LLMLoadError, match="local directory"):
        build_encoder(kind="dinov2", name_or_path=str(tmp_path), pretrained=True)


def test_torchvision_kind_builds_or_says_what_is_missing():
    spec = {"kind": "torchvision", "name_or_path": "resnet18", "pretrained": False, "preprocessing": {"image_size": 32}}
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(LLMLoadError, match="torchvision"):
            build_encoder(**spec)
        return
    enc = build_encoder(**spec)
    assert enc.dv == 512 and enc(frames()).shape == (2, 3, 512)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "vgg"}, "vision.kind"),
        ({**TINY_SPEC, "pretrained": True}, "pretrained=false"),
        ({**TINY_SPEC, "arch": {"layers": 3}}, "vision.arch"),
        ({**TINY_SPEC, "preprocessing": {"size": 32}}, "vision.preprocessing"),
        ({**TINY_SPEC, "preprocessing": {"mean": [0.5, 0.5]}}, "vision.preprocessing"),
        ({**TINY_SPEC, "preprocessing": {"resize": "pad"}}, "vision.preprocessing.resize"),
        ({"kind": "clip", "pretrained": False, "arch": {"hidden_size": 30, "num_attention_heads": 4}}, "clip"),
        ({"kind": "dinov2", "pretrained": False, "arch": {"hiden_size": 32}}, "hiden_size"),
    ],
)
def test_bad_vision_config_is_refused_naming_the_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_encoder(**spec)


def test_bad_frames_and_specs_are_refused():
    enc = build_encoder(**TINY_SPEC)
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        enc(torch.zeros(2, 3, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divide by 255"):
        enc(frames().float())
    with pytest.raises(ConfigError, match="unknown keys"):
        from_spec({**TINY_SPEC, "colour": "red"})


def test_model_with_an_encoder_freezes_it_and_reads_frames():
    from sim.models.model import SimV0Model

    llm = instantiate(make_cfg("llm=tiny").llm, _convert_="all")
    enc = build_encoder(**TINY_SPEC)
    model = SimV0Model(F=3, K=2, use_cached_vis_feats=False, llm=llm, vision_encoder=enc, vision_spec=enc.sim_spec)
    assert model.dv == enc.dv
    report = model.check_frozen()
    assert report["vision"]["trainable"] == 0 and report["vision"]["frozen"] > 0
    batch = {"frames": frames(), "telemetry": torch.randn(2, 8)}
    out = model(batch)
    assert out["risk_logits"].shape == (2, 4)
    out["risk_logits"].sum().backward()
    assert all(p.grad is None for p in enc.parameters())
    with pytest.raises(ConfigError, match=r"model\.dv=5"):
        SimV0Model(dv=5, F=3, K=2, use_cached_vis_feats=False, llm=llm, vision_encoder=enc)
    rebuilt = SimV0Model.from_metadata(model.metadata(), llm=llm)
    rebuilt.load_state_dict(model.trainable_state_dict())
    model.eval()
    torch.testing.assert_close(rebuilt(batch)["risk_logits"], model(batch)["risk_logits"])
