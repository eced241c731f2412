"""The `debug` group: fdr, overfit, limit, profiler, anomaly, as a user runs them."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch
from conftest import CONF, TINY, make_cfg

from sim.core.errors import ConfigError
from sim.core.run import RunDir, read_jsonl
from sim.models.build import build_model
from sim.training.debug import build_debug_callbacks
from sim.training.guards import NonFiniteError
from sim.training.train import train
from sim.training.trainer import Trainer

# The debug modes as users run them, with the tiny LLM and no logger but the CSV file (read by the tests).
DEBUG = [*TINY, "logger=csv", "logger.every_n_steps=1"]


def options() -> list[str]:
    return sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def logged_steps(run_dir) -> list[int]:
    import csv

    with open(run_dir / "metrics" / "scalars.csv", newline="") as fh:
        return sorted({int(r["step"]) for r in csv.DictReader(fh) if r["name"] == "train_step/loss"})


@pytest.mark.parametrize("option", options())
def test_every_debug_option_composes_and_builds(option):
    cfg = make_cfg(f"debug={option}")
    build_debug_callbacks(cfg)
    assert cfg.training.epochs >= 1 and "limit_train_batches" in cfg.debug


def test_every_mode_is_there():
    assert {"default", "fdr", "overfit", "limit", "profiler", "anomaly"} <= set(options())


def test_fdr_runs_one_batch_of_each_in_seconds(tmp_path):
    cfg = make_cfg(*DEBUG, "debug=fdr")
    t0 = time.perf_counter()
    train(cfg, run_dir=tmp_path)
    seconds = time.perf_counter() - t0
    assert logged_steps(tmp_path) == [1], "fdr took more than one optimizer step"
    (train_line,) = read_jsonl(tmp_path / "metrics" / "train_metrics.jsonl")
    (val_line,) = read_jsonl(tmp_path / "metrics" / "val_metrics.jsonl")
    assert train_line["epoch"] == val_line["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # A bound loose enough for a loaded CI machine; it takes about 3 s on 2 cores.
    assert seconds < 60, f"debug=fdr took {seconds:.0f} s"


def test_overfit_drives_the_train_loss_below_0_05(tmp_path, caplog):
    cfg = make_cfg(*DEBUG, "debug=overfit", "logger=none")
    with caplog.at_level(logging.INFO, logger="sim.training.debug"):
        train(cfg, run_dir=tmp_path)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics" / "train_metrics.jsonl")]
    assert len(losses) == cfg.training.epochs
    assert losses[-1] < 0.05, losses[-5:]
    assert any("fell to" in r.getMessage() for r in caplog.records)


def test_overfit_says_so_when_the_loss_does_not_fall(tmp_path, caplog):
    cfg = make_cfg(*DEBUG, "debug=overfit", "logger=none", "training.epochs=2", "optim.lr=1e-7")
    with caplog.at_level(logging.WARNING, logger="sim.training.debug"):
        train(cfg, run_dir=tmp_path)
    (warning,) = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "sim.training.debug"
    ]
    assert "cannot even memorize" in warning and "optim.lr" in warning


def test_overfit_trains_on_the_same_batches_every_epoch(tmp_path):
    trainer = Trainer(
        make_cfg(*DEBUG, "debug=overfit", "debug.overfit_batches=2", "data.batch_size=16"), RunDir(tmp_path)
    )
    trainer.setup()
    assert trainer.loaders.steps_per_epoch == 2
    ids = []
    for epoch in (1, 2):
        trainer.loaders.train_sampler.set_epoch(epoch)
        ids.append([b["risk_id"].tolist() + b["telemetry"].flatten().tolist() for b in trainer.loaders.train])
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    "limit, expected", [("0.25", lambda n: math.floor(0.25 * n)), ("3", lambda n: 3), ("1.0", lambda n: n)]
)
def test_limit_takes_a_fraction_or_a_count_of_the_batches(tmp_path, limit, expected):
    cfg = make_cfg(
        *DEBUG,
        "debug=limit",
        f"debug.limit_train_batches={limit}",
        f"debug.limit_val_batches={limit}",
        "data.batch_size=32",
    )
    trainer = Trainer(cfg, RunDir(tmp_path))
    trainer.setup()
    n_train = math.ceil(cfg.data.train_kwargs.num_samples / 32)
    n_val = math.ceil(cfg.data.val_kwargs.num_samples / 32)
    assert trainer.loaders.steps_per_epoch == expected(n_train)
    assert len(list(trainer.loaders.val)) == expected(n_val)
    assert len(list(trainer.loaders.train)) == expected(n_train)


@pytest.mark.parametrize(
    "override, key",
    [
        ("debug.limit_train_batches=0", "debug.limit_train_batches"),
        ("debug.limit_val_batches=1.5", "debug.limit_val_batches"),
        ("debug.limit_train_batches=true", "debug.limit_train_batches"),
        ("debug.overfit_batches=-1", "debug.overfit_batches"),
        ("debug.profiler.active=0", "debug.profiler.active"),
    ],
)
def test_bad_debug_settings_are_refused_naming_the_key(override, key):
    base = "debug=profiler" if "profiler" in override else "debug=limit"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_debug_callbacks(make_cfg(base, override))


def test_profiler_writes_a_trace_that_opens(tmp_path):
    train(make_cfg(*DEBUG, "debug=profiler"), run_dir=tmp_path)
    (trace,) = (tmp_path / "tensorboard" / "profiler").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    # Steps 3-5 are recorded (1 skipped, 1 warm-up), each with the ops of a training step.
    assert {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"} <= names, sorted(n for n in names if "Step" in n)
    assert any(n.startswith("aten::") for n in names) and any("backward" in n.lower() for n in names)


def test_anomaly_names_the_module_that_makes_a_nan(tmp_path):
    def poisoned(*args, **kwargs):
        model = build_model(*args, **kwargs)
        with torch.no_grad():
            model.tel_mlp[0].weight[0, 0] = math.nan  # a fault injected into one trainable module
        return model

    with pytest.raises(NonFiniteError, match=r"output of tel_mlp\.0 \(Linear\)"):
        train(make_cfg(*DEBUG, "debug=anomaly"), run_dir=tmp_path, model_builder=poisoned)
    assert not torch.is_anomaly_enabled(), "anomaly detection left on after the run failed"
