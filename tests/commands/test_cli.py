"""Every command is a Hydra main with its own conf file: --help, --cfg job and overrides work alike."""

from __future__ import annotations

import runpy
import sys

import pytest
from conftest import ROOT, run_cmd
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sim.__main__ import COMMANDS as COMMANDS_BY_NAME
from sim.__main__ import main as sim_main
from sim.core.cli import bare_args_as_list, comma_lists, compose
from sim.core.errors import ConfigError

# (command, arguments it needs to compose, a key of its own config); `python -m sim NAME` for the rest
COMMANDS = [
    ("train.py", [], "training"),
    ("evaluate.py", [], "checkpoint"),
    ("cache_features", ["vision=tiny"], "splits"),
    ("check_data", [], "max_listed"),
    ("synthetic", [], "num_train"),
    ("frames", [], "num_train"),
    ("export", [], "calibration_bins"),
    ("export_onnx", [], "parity_samples"),
    ("bench_latency", [], "backends"),
    ("bench", [], "steps"),
    ("bench_frames", [], "num_samples"),
    ("bench_validation", [], "budget"),
    ("compare", ["outputs/a", "outputs/b"], "dirs"),
    ("ablate", ["F=4,8", "K=1,2"], "seeds"),
]


def command_line(command: str) -> list[str]:
    return [command] if command.endswith(".py") else ["-m", "sim", command]


def run_in_process(command: str, args: list[str], monkeypatch) -> int | None:
    """Run a command's main in this process, as its command line would (no second start of Python);
    the exit status, or None where the command returned without exiting."""
    try:
        if command.endswith(".py"):
            monkeypatch.setattr(sys, "argv", [command, *args])
            runpy.run_path(str(ROOT / command), run_name="__main__")
            return None
        return sim_main([command, *args])
    except SystemExit as exited:
        return int(exited.code or 0)
    finally:
        GlobalHydra.instance().clear()


# runpy warns that a module it runs as __main__ was imported already (by the tests): harmless here.
@pytest.mark.filterwarnings("ignore::RuntimeWarning:runpy")
@pytest.mark.parametrize("command, args, key", COMMANDS, ids=[c for c, _, _ in COMMANDS])
def test_every_command_answers_cfg_job_and_help(command, args, key, monkeypatch, capsys):
    assert run_in_process(command, [*args, "--cfg", "job"], monkeypatch) in (None, 0)
    assert key in OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    assert run_in_process(command, [*args, "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "== Config ==" in out and f"\n{key}:" in out


def test_the_commands_answer_from_a_shell_as_a_user_runs_them():
    """The same through a new Python process: the top-level script and the dispatcher's module path."""
    for command, args, key in (c for c in COMMANDS if c[0] in ("train.py", "synthetic")):
        res = run_cmd(*command_line(command), *args, "--cfg", "job")
        assert res.returncode == 0, res.stderr[-2000:]
        assert key in OmegaConf.to_container(OmegaConf.create(res.stdout))


def test_the_dispatcher_lists_every_command_and_refuses_an_unknown_one(capsys):
    assert sim_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS_BY_NAME)
    assert sim_main(["no_such_command"]) == 1
    assert "unknown command 'no_such_command'" in capsys.readouterr().err


def test_contract_paths_still_import():
    """The import paths and command seed 000 and the contract show users."""
    from sim.dataset import SimDataset
    from sim.model import SimV0Model

    assert SimDataset.__module__ == "sim.data.dataset" and SimV0Model.__module__ == "sim.models.model"
    res = run_cmd("-m", "sim.cache_features", "vision=tiny", "--cfg", "job")
    assert res.returncode == 0 and "splits" in res.stdout


def test_benchmarks_compose_the_train_groups_with_their_own_keys():
    cfg = compose("bench", ["llm=gpt2", "llm.pretrained=false", "data=dummy", "steps=5", "reference=true"])
    assert (cfg.llm.arch.model_type, cfg.data.dataset_class_path, cfg.steps, cfg.reference) == (
        "gpt2",
        "sim.data.dataset.DummySimDataset",
        5,
        True,
    )
    assert cfg.training.epochs == compose("train").training.epochs and not cfg.training.progress_bar
    assert compose("bench_validation").llm.name_or_path == "tiny-gpt2"
    with pytest.raises(ConfigError, match="bad arguments 'stpes=5'"):
        compose("bench", ["stpes=5"])


def test_bare_directories_are_one_list_and_hydra_flags_keep_their_values():
    argv = ["runs/a", "--cfg", "job", "it's/b", "out=x", "--info", "config", "-m"]
    assert bare_args_as_list(argv, "dirs") == [
        "dirs=['runs/a','it\\'s/b']",
        "--cfg",
        "job",
        "out=x",
        "--info",
        "config",
        "-m",
    ]
    cfg = compose("compare", bare_args_as_list(["runs/a", "it's/b", "out=x"], "dirs"))
    assert (list(cfg.dirs), cfg.out) == (["runs/a", "it's/b"], "x")


def test_a_plain_comma_list_of_backends_is_one_list_not_a_sweep():
    argv = ["backends=eager_fp32,onnx_fp32", "backends=[eager_fp32]", "windows=5", "data.x=a,b"]
    assert comma_lists(argv, ["backends"]) == [
        "backends=[eager_fp32,onnx_fp32]",
        "backends=[eager_fp32]",
        "windows=5",
        "data.x=a,b",
    ]
    cfg = compose("bench_latency", comma_lists(["llm=tiny", "backends=eager_fp32,onnx_fp32"], ["backends"]))
    assert list(cfg.backends) == ["eager_fp32", "onnx_fp32"]
