"""evaluate.py on a trained tiny run: the val metrics of its best epoch again, the report files, the
high-risk threshold and calibration, and clear errors for a wrong LLM, wrong data or a bad checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECISIONS, TINY, make_cfg, run_cmd

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint, save_checkpoint
from sim.core.cli import compose
from sim.core.errors import CheckpointError, ConfigError, DataError
from sim.core.labels import METRIC_NAMES
from sim.core.run import read_jsonl
from sim.evaluation.evaluate import (
    check_llm_override,
    evaluate,
    expected_calibration_error,
    risk_high_operating_point,
    split_for_checkpoint,
    split_loader,
)
from sim.models.model import SimV0Model


@pytest.fixture(scope="module")
def evaluation(precision_run, tmp_path_factory):
    """`python evaluate.py checkpoint=<tiny run>/checkpoints/best.pt` as a user runs it (each precision)."""
    run_dir, result, _ = precision_run
    out = tmp_path_factory.mktemp("eval")
    res = run_cmd(
        "evaluate.py", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"hydra.run.dir={out}", "progress_bar=false"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, result, out, json.loads((out / "metrics.json").read_text())


def same(a, b) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-6)
    )


def test_evaluate_reproduces_the_val_metrics_of_the_best_epoch(evaluation):
    run_dir, result, _, report = evaluation
    logged = next(
        r for r in read_jsonl(run_dir / "metrics" / "val_metrics.jsonl") if r["epoch"] == result["best_epoch"]
    )
    assert report["epoch"] == result["best_epoch"]
    for name in METRIC_NAMES:
        assert same(report[name], logged[name]), f"{name}: evaluate.py {report[name]} vs logged {logged[name]}"
    assert report["evaluation"]["split"] == "val" and report["evaluation"]["num_samples"] > 0


def _data_option(option: str, synthetic_split: Path, frames_split: Path) -> list[str]:
    if option == "frames":
        return [
            "vision=tiny",
            "data=frames",
            "model.F=4",
            f"data.train_split_path={frames_split}/train",
            f"data.val_split_path={frames_split}/val",
        ]
    paths = [f"data.train_split_path={synthetic_split}/train", f"data.val_split_path={synthetic_split}/val"]
    if option == "custom":
        return ["data=custom", "data.dataset_class_path=custom_dataset.NpzRoverDataset", *paths]
    return ["data=cached", *paths]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("option", ["cached", "frames", "custom"])
def test_evaluate_reproduces_a_run_on_every_data_option(option, precision, synthetic_split, frames_split, tmp_path):
    """The README's `python evaluate.py checkpoint=... data=cached data.train_split_path=... data.val_split_path=...`,
    and the same for raw frames and a custom dataset class, in each precision."""
    from sim.training.train import train

    data = _data_option(option, synthetic_split, frames_split)
    result = train(make_cfg(*TINY, *PRECISIONS[precision], *data, "training.epochs=2"), run_dir=tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    out = tmp_path / "eval"
    eval_args = [f"checkpoint={best}", *[a for a in data if not a.startswith(("vision=", "model."))]]
    if option == "cached" and precision == "fp32":  # the command itself once, as the README shows it
        res = run_cmd("evaluate.py", *eval_args, f"hydra.run.dir={out}", "progress_bar=false")
        assert res.returncode == 0, res.stderr[-3000:]
        report = json.loads((out / "metrics.json").read_text())
    else:
        report = evaluate(compose("evaluate", [*eval_args, "progress_bar=false"]), out)
    logged = next(
        r for r in read_jsonl(tmp_path / "run" / "metrics" / "val_metrics.jsonl") if r["epoch"] == result["best_epoch"]
    )
    for name in METRIC_NAMES:
        assert same(report[name], logged[name]), (
            f"{option}/{precision} {name}: evaluate.py {report[name]} vs logged {logged[name]}"
        )
    assert report["evaluation"]["precision"] == load_checkpoint(best)["metadata"]["precision"]


def test_evaluate_writes_tables_figures_and_predictions(evaluation):
    _, _, out, report = evaluation
    n = report["evaluation"]["num_samples"]
    tables = json.loads((out / "per_class.json").read_text())
    md = (out / "per_class.md").read_text()
    for head in L.HEADS:
        rows = tables[head]
        assert [r["class"] for r in rows] == L.LABELS[head]
        assert sum(r["support"] for r in rows) == n
        cm = np.array(report["confusion"][head]["matrix"])
        assert cm.sum() == n and list(cm.sum(1)) == [r["support"] for r in rows]
        assert f"## {head}" in md and all(f"| {name} |" in md for name in L.LABELS[head])
        image = __import__("matplotlib.image", fromlist=["imread"]).imread(out / f"confusion_{head}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert (out / "calibration.png").stat().st_size > 1000
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n
    # The per-sample file and the confusion matrix tell the same story.
    wrong_risk = sum(not p["risk"]["correct"] for p in preds)
    cm = np.array(report["confusion"]["risk"]["matrix"])
    assert wrong_risk == cm.sum() - np.trace(cm)


def test_reported_threshold_is_what_predict_json_applies(evaluation):
    """The reported threshold applied through predict_json on the same split gives the reported recall and precision."""
    run_dir, _, _, report = evaluation
    path = run_dir / "checkpoints" / "best.pt"
    model = SimV0Model.from_checkpoint(path)
    cfg = compose("evaluate", [f"checkpoint={path}"])
    dataset = split_for_checkpoint(cfg, load_checkpoint(path)["metadata"], "val", path)
    t = report["risk_high_threshold"]
    tp = predicted = positives = 0
    for batch in split_loader(cfg.data, dataset):
        decisions = model.predict_json(batch, risk_high_threshold=t)
        for d, true in zip(decisions, batch["risk_id"].tolist(), strict=True):
            is_pred, is_true = d["risk"]["label"] == "high", true == L.RISK_HIGH
            tp += is_pred and is_true
            predicted += is_pred
            positives += is_true
    assert report["risk_high_threshold_recall"] == pytest.approx(tp / positives)
    assert report["risk_high_threshold_recall"] >= report["risk_high_target_recall"]
    assert report["risk_high_threshold_precision"] == pytest.approx(tp / predicted)
    assert report["confidence_ece"] is not None and 0.0 <= report["confidence_ece"] <= 1.0


def test_expected_calibration_error_on_known_cases():
    ece, bins = expected_calibration_error(np.full(10, 0.9), np.array([1] * 9 + [0]), n_bins=10)
    assert ece == pytest.approx(0.0) and sum(b["count"] for b in bins) == 10
    ece, _ = expected_calibration_error(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 0, 0]), n_bins=5)
    assert ece == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)  # the 1.0 bin: accuracy 0.5; the 0.0 bin: exact
    assert expected_calibration_error(np.array([]), np.array([]))[0] is None


def test_high_risk_operating_point_on_known_cases():
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.5, 0.1])
    is_high = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    argmax = p > 0.5
    op = risk_high_operating_point(p, argmax, is_high, 0.75)  # 3 of 4 highs: P(high) >= 0.4
    assert op["threshold"] == pytest.approx(0.4) and op["recall"] == pytest.approx(0.75)
    assert op["precision"] == pytest.approx(3 / 4)  # 0.9, 0.6, 0.4 and the 0.5 negative
    assert op["argmax_recall"] == pytest.approx(0.5) and op["argmax_precision"] == pytest.approx(1.0)
    # The arg-max already reaches 50%: threshold 1.0 changes nothing and costs nothing.
    op = risk_high_operating_point(p, argmax, is_high, 0.5)
    assert op["threshold"] == 1.0 and op["precision"] == op["argmax_precision"]
    with pytest.warns(UserWarning, match="no sample"):
        assert risk_high_operating_point(p, argmax, np.zeros(6, bool), 0.95)["threshold"] is None
    with pytest.raises(ConfigError, match="risk_high_target_recall"):
        risk_high_operating_point(p, argmax, is_high, 1.5)


def test_evaluate_on_the_train_split(tiny_run, tmp_path):
    run_dir = tiny_run[0]
    cfg = compose(
        "evaluate",
        [
            f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
            "split=train",
            "data.train_kwargs.num_samples=64",
            "progress_bar=false",
        ],
    )
    report = evaluate(cfg, tmp_path)
    assert report["evaluation"]["split"] == "train" and report["evaluation"]["num_samples"] == 64
    assert json.loads((tmp_path / "metrics.json").read_text())["action_accuracy"] == report["action_accuracy"]


def test_an_llm_other_than_the_checkpoints_is_refused(tiny_run, tmp_path):
    best = tiny_run[0] / "checkpoints" / "best.pt"
    res = run_cmd("evaluate.py", f"checkpoint={best}", "llm=gpt2", "llm.pretrained=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1
    assert "trained with LLM tiny-gpt2" in res.stderr and "gpt2" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    meta_llm = load_checkpoint(best)["metadata"]["llm"]
    # The same LLM in another dtype is the same LLM: the precision is the checkpoint's (or precision=...).
    check_llm_override(
        compose("evaluate", [f"checkpoint={best}", "llm=tiny", "llm.dtype=bfloat16"]).llm, meta_llm, best
    )
    with pytest.raises(CheckpointError, match="init_seed"):
        check_llm_override(
            compose("evaluate", [f"checkpoint={best}", "llm=tiny", "llm.init_seed=1"]).llm, meta_llm, best
        )


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("data.dataset_kwargs.dv=32", DataError, r"dv=64.*data\.dataset_kwargs\.dv=64"),
        ("model.F=6", ConfigError, r"model\.F=6 .*F=8"),
        ("split=test", ConfigError, "split='test'"),
    ],
)
def test_data_that_does_not_fit_the_checkpoint_is_refused(tiny_run, tmp_path, override, error, match):
    cfg = compose("evaluate", [f"checkpoint={tiny_run[0] / 'checkpoints' / 'best.pt'}", override])
    with pytest.raises(error, match=match):
        evaluate(cfg, tmp_path)


# ---- bad checkpoints ---------------------------------------------------------------------------
def _truncated(best: Path, path: Path) -> None:
    data = best.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(best: Path, path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _empty(best: Path, path: Path) -> None:
    path.write_bytes(b"")


def _foreign_state_dict(best: Path, path: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "epoch": 1}, path)


def _pickled_object(best: Path, path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)


def _other_format(best: Path, path: Path) -> None:
    ckpt = load_checkpoint(best)
    ckpt["metadata"]["format"] = "someone.else"
    save_checkpoint(path, ckpt)


def _other_architecture(best: Path, path: Path) -> None:
    ckpt = load_checkpoint(best)
    w = ckpt["model_state_dict"]["vis_proj.weight"]
    ckpt["model_state_dict"]["vis_proj.weight"] = torch.zeros(w.shape[0], w.shape[1] * 2)
    save_checkpoint(path, ckpt)


BAD_CHECKPOINTS = [
    (_truncated, "truncated or corrupt"),
    (_garbage, "truncated or corrupt"),
    (_empty, "truncated or corrupt"),
    (_foreign_state_dict, "not a SIM checkpoint"),
    (_pickled_object, "Python objects"),
    (_other_format, "not a SIM checkpoint.*someone.else"),
    (_other_architecture, "another architecture.*vis_proj.weight"),
]


@pytest.mark.parametrize("make, match", BAD_CHECKPOINTS, ids=[m.__name__.strip("_") for m, _ in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_by_name(tiny_run, tmp_path, make, match):
    path = tmp_path / "bad.pt"
    make(tiny_run[0] / "checkpoints" / "best.pt", path)
    with pytest.raises(CheckpointError, match=match) as info:
        SimV0Model.from_checkpoint(path)
    if make is not _other_architecture:  # that one names the tensor instead
        assert str(path) in str(info.value)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        SimV0Model.from_checkpoint(tmp_path / "nope.pt")


def test_evaluate_command_on_a_truncated_checkpoint_says_so_without_a_traceback(tiny_run, tmp_path):
    path = tmp_path / "torn.pt"
    _truncated(tiny_run[0] / "checkpoints" / "best.pt", path)
    res = run_cmd("evaluate.py", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'out'}")
    assert res.returncode == 1
    assert f"error: checkpoint {path} is truncated or corrupt" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


# ---- the metric table ------------------------------------------------------------------------------
def test_every_metric_of_the_table_is_computed_and_every_list_derives_from_it():
    from sim.core.config import FLOOR_METRICS
    from sim.evaluation.metrics import EpochMetrics, compute_losses, format_epoch_line
    from sim.evaluation.plots import CURVE_PANELS
    from sim.evaluation.report import KEY_METRICS
    from sim.evaluation.selection import monitor_mode

    g = torch.Generator().manual_seed(0)
    logits = {f"{h}_logits": torch.randn(16, n, generator=g) for h, n in L.NUM_CLASSES.items()}
    logits["confidence_logits"] = torch.randn(16, generator=g)
    batch = {f"{h}_id": torch.arange(16) % n for h, n in L.NUM_CLASSES.items()}
    batch["weight"] = torch.ones(16)
    tracker = EpochMetrics()
    tracker.update(logits, batch, compute_losses(logits, batch, L.DEFAULT_LOSS_WEIGHTS))
    # An entry of the table without its computation (or a computed metric left out of it) shows here.
    assert set(tracker.compute()) == set(METRIC_NAMES)
    assert [n for _, names in CURVE_PANELS for n in names] == [m.name for m in L.METRICS if m.panel]
    assert KEY_METRICS == ("risk_high_recall", "action_accuracy", "macro_f1")
    assert set(FLOOR_METRICS) == {m.name for m in L.METRICS if m.mode == "max"}
    assert monitor_mode("risk_high_fn_rate", "auto") == "min" and monitor_mode("loss_action", "auto") == "min"
    assert monitor_mode("macro_f1", "auto") == "max"
    line = format_epoch_line(
        2,
        4,
        {"loss": 1.0, "samples_per_s": 99.6},
        {"loss": 0.5, "risk_high_recall": None, "action_accuracy": 0.25, "macro_f1": 0.5},
        True,
    )
    assert line == (
        "epoch 2/4  train loss 1.0000 | val loss 0.5000  risk_high_recall null  action_accuracy 0.2500  "
        "macro_f1 0.5000  | 100 samples/s  (best)"
    )
