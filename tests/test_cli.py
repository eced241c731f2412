"""Every command is a Hydra main with its own conf file: --help, --cfg job and overrides work alike."""

from __future__ import annotations

import runpy
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT, run_cmd
from sim.cli import comma_lists, compose
from sim.errors import ConfigError

# (command, arguments it needs to compose, a key of its own config)
COMMANDS = [
    ("train.py", [], "training"),
    ("evaluate.py", [], "checkpoint"),
    ("sim.cache_features", ["vision=tiny"], "splits"),
    ("sim.check_data", [], "max_listed"),
    ("sim.synthetic", [], "num_train"),
    ("sim.frames", [], "num_train"),
    ("sim.export_onnx", [], "parity_samples"),
    ("sim.bench_latency", [], "backends"),
    ("sim.bench", [], "steps"),
    ("sim.bench_frames", [], "num_samples"),
    ("sim.bench_validation", [], "budget"),
]


def command_line(command: str) -> list[str]:
    return [command] if command.endswith(".py") else ["-m", command]


# runpy warns that a module it runs as __main__ was imported already (by the tests): harmless here.
@pytest.mark.filterwarnings("ignore::RuntimeWarning:runpy")
@pytest.mark.parametrize("command, args, key", COMMANDS, ids=[c for c, _, _ in COMMANDS])
def test_every_command_answers_cfg_job_and_help(command, args, key, monkeypatch, capsys):
    res = run_cmd(*command_line(command), *args, "--cfg", "job")
    assert res.returncode == 0, res.stderr[-2000:]
    assert key in OmegaConf.to_container(OmegaConf.create(res.stdout))
    # --help takes the same path through Hydra; run as __main__ in this process, it costs no second
    # start of Python.
    monkeypatch.setattr(sys, "argv", [command, *args, "--help"])
    try:
        with pytest.raises(SystemExit) as exited:
            if command.endswith(".py"):
                runpy.run_path(str(ROOT / command), run_name="__main__")
            else:
                runpy.run_module(command, run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "== Config ==" in out and f"\n{key}:" in out


def test_benchmarks_compose_the_train_groups_with_their_own_keys():
    cfg = compose("bench", ["llm=gpt2", "llm.pretrained=false", "data=dummy", "steps=5", "reference=true"])
    assert (cfg.llm.arch.model_type, cfg.data.dataset_class_path, cfg.steps, cfg.reference) == (
        "gpt2", "sim.dataset.DummySimDataset", 5, True)
    assert cfg.training.epochs == compose("train").training.epochs and not cfg.training.progress_bar
    assert compose("bench_validation").llm.name_or_path == "tiny-gpt2"
    with pytest.raises(ConfigError, match="bad arguments 'stpes=5'"):
        compose("bench", ["stpes=5"])


def test_a_plain_comma_list_of_backends_is_one_list_not_a_sweep():
    argv = ["backends=eager_fp32,onnx_fp32", "backends=[eager_fp32]", "windows=5", "data.x=a,b"]
    assert comma_lists(argv, ["backends"]) == ["backends=[eager_fp32,onnx_fp32]", "backends=[eager_fp32]", "windows=5",
                                               "data.x=a,b"]
    cfg = compose("bench_latency", comma_lists(["llm=tiny", "backends=eager_fp32,onnx_fp32"], ["backends"]))
    assert list(cfg.backends) == ["eager_fp32", "onnx_fp32"]
