"""The `logger` group: what each backend holds, read back with its own reader, against metrics/*.jsonl."""

from __future__ import annotations

import csv
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, TINY, make_cfg, run_cmd

from sim.core.run import read_jsonl
from sim.training.callbacks import StepInfo
from sim.training.loggers import (
    CSVLogger,
    LoggerAdapter,
    Loggers,
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
    build_loggers,
    flatten,
)
from sim.training.train import build_callbacks, train

# 3 epochs of 2 optimizer steps with the tiny LLM: a few seconds.
SMALL = [
    *TINY,
    "data.train_kwargs.num_samples=64",
    "data.val_kwargs.num_samples=32",
    "data.batch_size=32",
    "training.epochs=3",
]
ALL = "logger=[tensorboard,mlflow,wandb,csv]"
MONITOR = "risk_high_recall"


def options() -> list[str]:
    return sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))


def val_records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics" / "val_metrics.jsonl")


def expected_series(run_dir: Path) -> dict[str, list[float]]:
    """Per val metric, its values epoch by epoch as the JSONL file has them (null metrics are not logged)."""
    out: dict[str, list[float]] = {}
    for record in val_records(run_dir):
        for name, value in record.items():
            if name != "epoch" and value is not None:
                out.setdefault(f"val/{name}", []).append(value)
    return out


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc


def as_float32(values: list[float]) -> list[float]:
    """What TensorBoard keeps of a float64: its float32 rounding."""
    return [float(np.float32(v)) for v in values]


def mlflow_db(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One run that logs to every backend at every step; the backends are read back by the tests."""
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("logged_run")
    cfg = make_cfg(
        *SMALL,
        ALL,
        "logger.every_n_steps=1",
        f"logger.mlflow.tracking_uri={mlflow_db(tmp)}",
        "logger.experiment=logged",
    )
    run_dir = tmp / "run"
    result = train(cfg, run_dir=run_dir)
    yield run_dir, result, cfg, mlflow_db(tmp)
    wandb.teardown()  # ends the W&B service process this run started


def test_every_logger_option_composes_and_builds():
    assert {"tensorboard", "mlflow", "wandb", "csv", "none"} <= set(options())
    types = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger, "csv": CSVLogger}
    for name, cls in types.items():
        (loggers,) = build_loggers(make_cfg(f"logger={name}"))
        assert [type(a) for a in loggers.adapters] == [cls]
    (loggers,) = build_loggers(make_cfg(ALL))
    assert sorted(a.name for a in loggers.adapters) == ["csv", "mlflow", "tensorboard", "wandb"]
    assert build_loggers(make_cfg("logger=none")) == []
    (default,) = build_loggers(make_cfg())
    assert [a.name for a in default.adapters] == ["tensorboard"]  # on by default


def test_tensorboard_holds_the_jsonl_numbers_exactly(logged_run):
    run_dir, result, cfg, _ = logged_run
    scalars, acc = tensorboard_scalars(run_dir / "tensorboard")
    expected = expected_series(run_dir)
    assert expected, "the run wrote no val metrics"
    for tag, values in expected.items():
        assert [v for _, v in scalars[tag]] == as_float32(values), tag
    # Epoch points sit at the epoch's last optimizer step; per-step points at every step.
    assert [s for s, _ in scalars["val/loss"]] == [2, 4, 6]
    assert [v for _, v in scalars["epoch"]] == [1.0, 2.0, 3.0]
    for name in ("loss", "loss_risk", "loss_reason", "loss_action", "lr", "grad_norm", "samples_per_s"):
        assert [s for s, _ in scalars[f"train_step/{name}"]] == [1, 2, 3, 4, 5, 6], name
    # The norm is taken before clipping: a clipped norm could never exceed training.grad_clip.
    assert max(v for _, v in scalars["train_step/grad_norm"]) > cfg.training.grad_clip
    best = result["best"][MONITOR]
    assert scalars[f"best/{MONITOR}"][-1][1] == float(np.float32(best))
    assert set(acc.Tags()["images"]) == {
        "training_curves",
        "confusion_val/risk",
        "confusion_val/reason",
        "confusion_val/action",
    }

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == cfg.optim.lr
    assert start.hparams["llm.name_or_path"].string_value == "tiny-gpt2"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [f"best/{MONITOR}", f"val/{MONITOR}"]


def test_mlflow_run_holds_the_jsonl_numbers_exactly(logged_run):
    from mlflow.tracking import MlflowClient

    run_dir, result, cfg, uri = logged_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("logged")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["sim.run_dir"] == str(run_dir.resolve())
    for tag, values in expected_series(run_dir).items():
        history = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)
        assert [m.value for m in history] == values, tag
    assert run.data.metrics[f"best/{MONITOR}"] == result["best"][MONITOR]
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images/confusion_val")}
    assert images == {f"images/confusion_val/confusion_{h}.png" for h in ("risk", "reason", "action")}


def test_wandb_offline_files_hold_the_jsonl_numbers_exactly(logged_run):
    from wandb_offline import config, history

    run_dir, _, cfg, _ = logged_run
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(path)
    for tag, values in expected_series(run_dir).items():
        assert [r[tag] for r in rows if tag in r] == values, tag
    assert [r["_step"] for r in rows if "val/loss" in r] == [2, 4, 6]
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2, 3]
    assert config(path)["optim"]["lr"] == cfg.optim.lr


def test_csv_holds_the_jsonl_numbers_exactly(logged_run):
    run_dir, _, _, _ = logged_run
    with open(run_dir / "metrics" / "scalars.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for tag, values in expected_series(run_dir).items():
        assert [float(r["value"]) for r in rows if r["name"] == tag] == values, tag


@pytest.mark.slow  # a multirun command: a process importing torch, two trials, a new MLflow database
def test_a_sweep_logs_each_trial_as_a_run_of_one_experiment(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "sweep"
    res = run_cmd(
        "train.py",
        "-m",
        "training.seed=1,2",
        *SMALL,
        "training.epochs=1",
        "logger=[tensorboard,mlflow]",
        f"logger.mlflow.tracking_uri={mlflow_db(tmp_path)}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_db(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("sim").experiment_id])
    by_dir = {Path(r.data.tags["sim.run_dir"]): r for r in runs}
    assert set(by_dir) == {(sweep_dir / "0").resolve(), (sweep_dir / "1").resolve()}
    assert {r.data.tags["sim.sweep"] for r in runs} == {f"{tmp_path.name}/sweep"}
    for trial_dir, run in by_dir.items():
        assert run.data.params["training.seed"] == str(int(trial_dir.name) + 1)
        assert run.data.metrics["val/loss"] == val_records(trial_dir)[-1]["loss"]
        scalars, _ = tensorboard_scalars(trial_dir / "tensorboard")
        assert [v for _, v in scalars["val/loss"]] == as_float32([val_records(trial_dir)[-1]["loss"]])


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FailsMidRun(LoggerAdapter):
    """A backend whose disk fills up at its second write."""

    name = "flaky"

    def __init__(self) -> None:
        self.writes = 0

    def log_scalars(self, values, step):
        self.writes += 1
        if self.writes >= 2:
            raise OSError(28, "No space left on device")


def test_broken_loggers_warn_once_and_the_run_completes(tmp_path, caplog, monkeypatch):
    pytest.importorskip("mlflow")
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: the adapter sets them
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a directory should be")
    cfg = make_cfg(
        *SMALL,
        "logger=[tensorboard,mlflow,csv]",
        "logger.every_n_steps=1",
        f"logger.tensorboard.log_dir={blocker / 'tensorboard'}",
        f"logger.csv.path={blocker / 'scalars.csv'}",
        f"logger.mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
        "logger.mlflow.request_retries=0",
    )
    flaky = FailsMidRun()
    callbacks = build_callbacks(cfg)
    callbacks[-1].adapters.append(flaky)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sim.training.loggers"):
        train(cfg, run_dir=run_dir, callbacks=callbacks)

    assert [r["epoch"] for r in val_records(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "training_curves.png").is_file()
    failures = [r.getMessage() for r in caplog.records if "it is off for the rest of this run" in r.getMessage()]
    for name in ("tensorboard", "mlflow", "csv", "flaky"):
        assert sum(m.startswith(f"logger {name} failed") for m in failures) == 1, (name, failures)
    assert flaky.writes == 2, "a failed logger was called again"


def test_steps_are_read_from_the_device_only_when_logged():
    class Recorder(LoggerAdapter):
        def __init__(self):
            self.steps = []

        def log_scalars(self, values, step):
            self.steps.append(step)

    class Tensor:
        """Stands for a device tensor; reading it is what the loggers must do rarely."""

        reads = 0

        def float(self):
            return self

        def reshape(self, shape):
            Tensor.reads += 1
            import torch

            return torch.tensor(1.0)

    recorder = Recorder()
    loggers = Loggers([recorder], every_n_steps=4)
    loggers.active = [recorder]

    class Dist:
        world_size = 1

    class FakeTrainer:
        dist = Dist()

    for step in range(1, 13):
        loggers.on_step_end(FakeTrainer(), StepInfo(step, 1, {"loss": Tensor()}, 1e-3, Tensor(), 32, 0.1))
    assert recorder.steps == [4, 8, 12]
    assert Tensor.reads == 6  # loss and grad norm, on the three logged steps only


def test_flatten_gives_the_types_hyperparameter_views_accept():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True, "f": "x", "g": 0.5})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": "null", "e": True, "f": "x", "g": 0.5}


@pytest.mark.parametrize(
    "override, key",
    [("logger.every_n_steps=0", "logger.every_n_steps"), ("logger.wandb.mode=sometimes", "logger.wandb.mode")],
)
def test_bad_logger_settings_are_refused_naming_the_key(override, key):
    from sim.core.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_loggers(make_cfg("logger=[tensorboard,wandb]", override))
