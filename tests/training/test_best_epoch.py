"""Which epoch best.pt holds: the monitor decides only among epochs that meet checkpoint.min_metrics."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY, make_cfg

from sim.core import labels as L
from sim.core.config import validate_config
from sim.core.errors import ConfigError
from sim.core.run import RunDir, read_jsonl
from sim.data.synthetic import SyntheticSimDataset
from sim.evaluation.metrics import metrics_from_confusion
from sim.evaluation.report import best_epoch
from sim.evaluation.selection import BestEpochRule
from sim.training.trainer import Trainer

DEFAULT = BestEpochRule.from_config(make_cfg().checkpoint)
FLOORS = {"checkpoint.min_metrics.macro_f1": 0.8}  # the default, as sim.report reads it from a run


def _confusion(true: torch.Tensor, pred: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(true * n + pred, minlength=n * n).reshape(n, n)


def _val_metrics(risk_pred: torch.Tensor | None, action_pred: torch.Tensor | None) -> dict:
    """The contract metrics of given predictions on the synthetic val split (None: all correct)."""
    val = SyntheticSimDataset(split="val", num_samples=512).label_arrays()
    cms = {}
    for head in L.HEADS:
        true = torch.as_tensor(val[head])
        pred = {"risk": risk_pred, "action": action_pred}.get(head)
        cms[head] = _confusion(true, true if pred is None else pred, L.NUM_CLASSES[head])
    return metrics_from_confusion(cms)


def _judge_all(rule: BestEpochRule, epochs: list[dict]) -> tuple[int, list[str]]:
    """Feed per-epoch val metrics through the rule as the trainer does; the best epoch and the log lines."""
    key, best, best_m, why = None, 0, None, []
    for m in epochs:
        wins, k, text = rule.judge(m["epoch"], m, key, best, best_m)
        why.append(text)
        if wins:
            key, best, best_m = k, m["epoch"], m
    return best, why


def test_an_epoch_that_calls_everything_high_never_wins():
    n = len(SyntheticSimDataset(split="val", num_samples=512))
    # The worst case for the floors: the action head is perfect, only risk is degenerate.
    degenerate = _val_metrics(torch.full((n,), L.RISK_HIGH), None)
    assert degenerate["risk_high_recall"] == 1.0 and degenerate["risk_f1_macro"] <= 0.25
    assert degenerate["macro_f1"] <= 0.625 < DEFAULT.min_metrics["macro_f1"]
    val = SyntheticSimDataset(split="val", num_samples=512).label_arrays()
    risk = torch.as_tensor(val["risk"]).clone()
    high = (risk == L.RISK_HIGH).nonzero().flatten()
    risk[high[: len(high) // 10]] = 2  # a sane model that misses a tenth of the high scenes
    sane = _val_metrics(risk, None)
    assert sane["risk_high_recall"] < degenerate["risk_high_recall"]

    for order in ([sane, degenerate], [degenerate, sane]):
        epochs = [{**m, "epoch": i + 1} for i, m in enumerate(order)]
        best, why = _judge_all(DEFAULT, epochs)
        assert epochs[best - 1]["risk_f1_macro"] == sane["risk_f1_macro"], why
        assert best_epoch(epochs, FLOORS)[0] == best
    # Without the floors the monitor alone picks the degenerate epoch: the floors are what prevents it.
    assert _judge_all(BestEpochRule("risk_high_recall", tie_breaker="macro_f1"), epochs)[0] == 1


# A run whose recall peaks on an epoch that calls nearly everything "high" (2), then on an early
# epoch that is not degenerate but not good either (3: a third of its actions wrong), as measured runs of
# the pretrained default did.
RUN = [
    {"epoch": 1, "risk_high_recall": 0.93, "macro_f1": 0.81},
    {"epoch": 2, "risk_high_recall": 0.99, "macro_f1": 0.39},
    {"epoch": 3, "risk_high_recall": 0.98, "macro_f1": 0.66},
    {"epoch": 4, "risk_high_recall": 0.95, "macro_f1": 0.85},
    {"epoch": 5, "risk_high_recall": 0.95, "macro_f1": 0.88},
    {"epoch": 6, "risk_high_recall": 0.97, "macro_f1": 0.93},
    {"epoch": 7, "risk_high_recall": 0.96, "macro_f1": 0.94},
]


def test_the_log_says_why_each_epoch_won_or_lost():
    best, why = _judge_all(DEFAULT, RUN)
    assert best == 6
    assert why[0] == "epoch 1 is best (the first epoch): risk_high_recall 0.9300; macro_f1 0.8100 >= 0.8 required"
    assert why[1] == (
        "epoch 2 is not best: risk_high_recall 0.9900 vs 0.9300 of epoch 1, but it misses the floors "
        "(macro_f1 0.3900 < 0.8 required)"
    )
    assert why[2].startswith("epoch 3 is not best: risk_high_recall 0.9800 vs 0.9300 of epoch 1, but it misses")
    assert why[3] == "epoch 4 is best: risk_high_recall 0.9500 > 0.9300 of epoch 1; macro_f1 0.8500 >= 0.8 required"
    assert why[4] == (
        "epoch 5 is best: risk_high_recall 0.9500 ties 0.9500 of epoch 4, macro_f1 0.8800 vs 0.8500 "
        "decides (a full tie keeps the earlier epoch); macro_f1 0.8800 >= 0.8 required"
    )
    assert why[6].startswith("epoch 7 is not best: risk_high_recall 0.9600 < 0.9700 of epoch 6;")
    assert best_epoch(RUN, FLOORS) == (6, RUN[5])
    assert best_epoch(RUN[:3], FLOORS)[0] == 1
    assert best_epoch(RUN[:3], dict.fromkeys(FLOORS))[0] == 2  # a null floor is no floor


def test_until_an_epoch_meets_the_floors_the_closest_one_is_kept():
    rule = BestEpochRule("risk_high_recall", tie_breaker="macro_f1", min_metrics={"macro_f1": 0.9})
    best, why = _judge_all(rule, RUN[:6])
    assert why[0] == (
        "epoch 1 is best (the first epoch, for now): risk_high_recall 0.9300; macro_f1 0.8100 < 0.9 required"
    )
    assert why[3] == (
        "epoch 4 is best for now: no epoch has met the floors yet and it comes closest (macro_f1 0.8500 < 0.9 required)"
    )
    assert best == 6 and why[5].startswith(
        "epoch 6 is best: the first epoch to meet the floors; risk_high_recall 0.9700;"
    )
    # Undefined metrics rank last, and the mode turns the monitor around.
    assert rule.key({"macro_f1": None}) < rule.key({"macro_f1": 0.0})
    by_loss = BestEpochRule("loss", tie_breaker="macro_f1")
    assert by_loss.key({"loss": 0.2}) > by_loss.key({"loss": 0.3}) > by_loss.key({"loss": None})


@pytest.mark.parametrize(
    "override, message",
    [
        ("+checkpoint.min_metrics.accuracy=0.5", "checkpoint.min_metrics.accuracy: expected one of"),
        ("+checkpoint.min_metrics.loss=0.5", "checkpoint.min_metrics.loss: expected one of"),
        ("checkpoint.min_metrics.macro_f1=high", "checkpoint.min_metrics.macro_f1='high' must be a finite number"),
        ("checkpoint.min_metrics=0.5", "checkpoint.min_metrics=0.5: expected"),
    ],
)
def test_bad_floors_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg(*TINY, override))


SMALL = [*TINY, "data.train_kwargs.num_samples=64", "data.val_kwargs.num_samples=32", "data.batch_size=32"]


def _fit(run_dir, *overrides: str) -> tuple[Trainer, dict]:
    """A real tiny run whose val metrics are those of RUN: the trainer's own selection, saving and resume."""
    trainer = Trainer(make_cfg(*SMALL, *overrides), RunDir(run_dir))
    trainer.setup()
    evaluate = trainer.evaluate
    trainer.evaluate = lambda loader, split, epoch: {**evaluate(loader, split, epoch), **RUN[epoch - 1]}
    return trainer, trainer.fit()


def test_the_trainer_skips_the_collapsed_epoch_and_resumes_its_choice_exactly(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sim.training.trainer"):
        _, result = _fit(tmp_path / "whole", "training.epochs=7")
    assert result["best_epoch"] == 6
    best = torch.load(tmp_path / "whole" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 6 and best["metrics"]["risk_high_recall"] == 0.97
    assert "epoch 2 is not best: risk_high_recall 0.9900 vs 0.9300 of epoch 1, but it misses the floors" in caplog.text
    assert "epoch 6 is best: risk_high_recall 0.9700 > 0.9500 of epoch 5;" in caplog.text

    _fit(tmp_path / "resumed", "training.epochs=4")  # stops after epoch 4, then continues to 7
    trainer, resumed = _fit(tmp_path / "resumed", "training.epochs=7", "training.resume=auto")
    assert trainer.start_epoch == 5 and resumed["best_epoch"] == 6
    whole, again = (
        torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["state"] for d in ("whole", "resumed")
    )
    assert again["best_key"] == whole["best_key"] and again["best_epoch"] == whole["best_epoch"] == 6
    assert [r["epoch"] for r in read_jsonl(tmp_path / "resumed" / "metrics" / "val_metrics.jsonl")] == list(range(1, 8))
