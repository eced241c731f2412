"""Early stopping on checkpoint.monitor: the rule, the log line, and the same stop after a resume."""

from __future__ import annotations

import logging

import pytest
from conftest import TINY, make_cfg

from sim.core.config import validate_config
from sim.core.errors import ConfigError
from sim.core.run import read_jsonl
from sim.training.early_stopping import EarlyStopping, build_early_stopping
from sim.training.train import train

SMALL = [*TINY, "data.train_kwargs.num_samples=64", "data.val_kwargs.num_samples=32", "data.batch_size=32"]
# No epoch can beat the first by more than 1 in a loss: the run stops after 1 + patience epochs.
STOPS_AT_3 = ["checkpoint.monitor=loss", "training.early_stopping.patience=2", "training.early_stopping.min_delta=1.0"]


def history(*values):
    return [{"epoch": i + 1, "m": v} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    "mode, values, min_delta, best, best_epoch, stale",
    [
        ("max", (0.5, 0.6, 0.6, 0.55), 0.0, 0.6, 2, 2),
        ("max", (0.5, 0.55, 0.58), 0.1, 0.5, 1, 2),  # improvements within min_delta do not count
        ("min", (1.0, 0.8, 0.9, 0.7), 0.0, 0.7, 4, 0),
        ("max", (None, None, 0.2, None), 0.0, 0.2, 3, 1),  # an undefined value never improves
    ],
)
def test_the_rule_counts_epochs_since_a_real_improvement(mode, values, min_delta, best, best_epoch, stale):
    state = EarlyStopping("m", mode, patience=3, min_delta=min_delta).standing(history(*values))
    assert (state.best, state.best_epoch, state.stale) == (best, best_epoch, stale)


def test_off_by_default_and_bad_settings_are_refused():
    assert build_early_stopping(make_cfg()) == []
    (es,) = build_early_stopping(make_cfg(*STOPS_AT_3))
    assert (es.monitor, es.mode, es.patience, es.min_delta) == ("loss", "min", 2, 1.0)
    for override, key in (
        ("training.early_stopping.patience=0", "patience"),
        ("training.early_stopping.min_delta=-1", "min_delta"),
    ):
        with pytest.raises(ConfigError, match=f"training\\.early_stopping\\.{key}"):
            validate_config(make_cfg(override))


def without_timing(records):
    # samples_per_s is wall-clock throughput: it differs between any two runs.
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def test_stops_when_told_logs_why_and_stops_at_the_same_epoch_after_a_resume(tmp_path, caplog):
    ref = tmp_path / "uninterrupted"
    with caplog.at_level(logging.INFO, logger="sim.training.early_stopping"):
        result = train(make_cfg(*SMALL, *STOPS_AT_3, "training.epochs=6"), run_dir=ref)
    expected = read_jsonl(ref / "metrics" / "val_metrics.jsonl")
    assert [r["epoch"] for r in expected] == [1, 2, 3] and result["best_epoch"] == 3
    assert any(r.getMessage().startswith("early stopping after epoch 3 of 6") for r in caplog.records)

    # The same run, interrupted after epoch 2 and resumed: it stops after epoch 3 too, with the same numbers.
    run = tmp_path / "resumed"
    train(make_cfg(*SMALL, *STOPS_AT_3, "training.epochs=2"), run_dir=run)
    train(make_cfg(*SMALL, *STOPS_AT_3, "training.epochs=6", "training.resume=auto"), run_dir=run)
    assert without_timing(read_jsonl(run / "metrics" / "val_metrics.jsonl")) == without_timing(expected)

    # Resumed once more, a run that has stopped stays stopped.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sim.training.early_stopping"):
        train(make_cfg(*SMALL, *STOPS_AT_3, "training.epochs=6", "training.resume=auto"), run_dir=run)
    assert [r["epoch"] for r in read_jsonl(run / "metrics" / "val_metrics.jsonl")] == [1, 2, 3]
    assert any("nothing left to train" in r.getMessage() for r in caplog.records)

    # TensorBoard (the default logger) holds each epoch once, as the JSONL file does, across the resumes.
    from test_loggers import as_float32, tensorboard_scalars

    scalars, _ = tensorboard_scalars(run / "tensorboard")
    assert [v for _, v in scalars["val/loss"]] == as_float32([r["loss"] for r in expected])
