"""Training end to end: what it must achieve, what it writes, and that only the heads learn."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import TINY, make_cfg, run_cmd

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint
from sim.core.labels import METRIC_NAMES
from sim.core.run import RunDir, read_jsonl
from sim.data.synthetic import SyntheticSimDataset
from sim.models.model import TRAINABLE_MODULES, SimV0Model
from sim.training.trainer import Trainer

CONTRACT_METRICS = set(METRIC_NAMES) | {"epoch", "lr", "samples_per_s"}


def test_tiny_llm_learns_the_synthetic_rules(tiny_run):
    run_dir, _, cfg = tiny_run
    val = read_jsonl(run_dir / "metrics/val_metrics.jsonl")
    train = read_jsonl(run_dir / "metrics/train_metrics.jsonl")
    assert len(val) == len(train) == cfg.training.epochs
    assert train[-1]["loss"] < 0.5 * train[0]["loss"], "training loss did not fall"
    last = val[-1]
    assert last["action_accuracy"] >= 0.9, last
    assert last["risk_high_recall"] >= 0.9, last
    # Chance on the synthetic split is far below: the rules, not the label frequencies, were learned.
    assert val[0]["action_accuracy"] < last["action_accuracy"]


def test_run_tree_is_complete(tiny_run):
    run_dir, _, cfg = tiny_run
    for rel in (
        "config_resolved.yaml",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/epoch_001.pt",
        "metrics/train_metrics.jsonl",
        "metrics/val_metrics.jsonl",
        "logs/stdout.log",
        "export/labels.json",
        "export/sim_v0_infer.py",
    ):
        assert (run_dir / rel).is_file(), rel
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["model"]["K"] == cfg.model.K and resolved["llm"]["arch"]["n_layer"] == 2
    assert (
        resolved["_run"]["versions"]["torch"] == torch.__version__.split("+")[0]
        or resolved["_run"]["versions"]["torch"]
    )
    assert "commit" in resolved["_run"]["git"]
    labels = json.loads((run_dir / "export/labels.json").read_text())
    assert labels["action"]["5"] == "turn_right" and labels["risk"]["3"] == "high"
    log_text = (run_dir / "logs/stdout.log").read_text()
    assert "parameters: trainable" in log_text and f"epoch {cfg.training.epochs}/{cfg.training.epochs}" in log_text
    for split in ("train", "val"):
        for record in read_jsonl(run_dir / f"metrics/{split}_metrics.jsonl"):
            assert set(record) >= CONTRACT_METRICS, CONTRACT_METRICS - set(record)
            assert record["samples_per_s"] > 0


def test_best_checkpoint_follows_the_monitor(tiny_run):
    run_dir, result, cfg = tiny_run
    val = read_jsonl(run_dir / "metrics/val_metrics.jsonl")
    floors = cfg.checkpoint.min_metrics
    eligible = [m for m in val if all(m[name] >= floor for name, floor in floors.items())]
    assert eligible, f"no epoch met checkpoint.min_metrics {dict(floors)}"
    key = lambda m: (m["risk_high_recall"], m["macro_f1"])  # noqa: E731
    best = max(eligible, key=key)
    assert result["best_epoch"] == min(m["epoch"] for m in eligible if key(m) == key(best))
    ckpt = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert ckpt["epoch"] == result["best_epoch"]
    assert ckpt["metrics"]["risk_high_recall"] == best["risk_high_recall"]
    # What a user ships is best.pt, so it, not only the last epoch, must have learned the rules.
    assert best["action_accuracy"] >= 0.9 and best["risk_high_recall"] >= 0.95, best


def test_checkpoint_loads_safely_and_rebuilds_the_same_predictions(tiny_run):
    run_dir, _, _ = tiny_run
    ckpt = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "epoch", "metrics", "metadata"} <= set(ckpt)
    meta = ckpt["metadata"]
    assert (meta["dv"], meta["d"], meta["F"], meta["K"]) == (64, 128, 8, 4)
    assert meta["labels"] == L.LABELS and len(meta["telemetry_mean"]) == 8
    assert not any(k.startswith("llm.") for k in ckpt["model_state_dict"]), "frozen LLM weights in the checkpoint"

    model = SimV0Model.from_checkpoint(run_dir / "checkpoints/best.pt")
    val = SyntheticSimDataset(split="val", num_samples=512, F=8, dv=64)
    batch = val.__getitems__(list(range(len(val))))
    with torch.no_grad():
        logits = model(batch)
    acc = (logits["action_logits"].argmax(-1) == batch["action_id"]).float().mean().item()
    assert acc == pytest.approx(ckpt["metrics"]["action_accuracy"], abs=1e-6)

    preds = model.predict_json({k: v[:3] for k, v in batch.items()})
    assert len(preds) == 3 and preds[0]["sample_id"] == batch["sample_id"][0]
    assert preds[0]["action"]["label"] in L.ACTION and math.isclose(
        sum(preds[0]["risk"]["probs"].values()), 1, abs_tol=1e-4
    )
    assert 0.0 <= preds[0]["confidence"] <= 1.0


def test_seed_readme_loading_example_works(tiny_run):
    """The README's "Loading checkpoints" flow: build the model with the same config, load the weights."""
    run_dir, _, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    meta = checkpoint["metadata"]
    model = SimV0Model(llm=meta["llm"], dv=meta["dv"], d=meta["d"], F=meta["F"], K=meta["K"], use_cached_vis_feats=True)
    model.load_state_dict(checkpoint["model_state_dict"])
    reference = SimV0Model.from_checkpoint(run_dir / "checkpoints/best.pt")
    batch = SyntheticSimDataset(split="val", num_samples=16).__getitems__(list(range(16)))
    assert model.predict_json(batch) == reference.predict_json(batch)


def _accuracy(model, batch):
    with torch.no_grad():
        return (model(batch)["action_logits"].argmax(-1) == batch["action_id"]).float().mean().item()


def test_both_branches_matter(tiny_run):
    run_dir, _, _ = tiny_run
    model = SimV0Model.from_checkpoint(run_dir / "checkpoints/best.pt")
    val = SyntheticSimDataset(split="val", num_samples=512)
    batch = val.__getitems__(list(range(len(val))))
    full = _accuracy(model, batch)
    # Telemetry at its training mean: the telemetry token then carries no information.
    no_tel = _accuracy(model, {**batch, "telemetry": model.tel_mean.expand_as(batch["telemetry"]).clone()})
    no_vis = _accuracy(model, {**batch, "vis_feats": torch.zeros_like(batch["vis_feats"])})
    assert no_tel < full - 0.15, (full, no_tel)
    assert no_vis < full - 0.3, (full, no_vis)


def test_only_the_trainable_modules_change(tmp_path):
    cfg = make_cfg(*TINY, "training.epochs=1", "data.train_kwargs.num_samples=128", "data.val_kwargs.num_samples=64")
    trainer = Trainer(cfg, RunDir(tmp_path))
    trainer.setup()
    model = trainer.model
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    trainer.fit()
    for k, v in model.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), f"frozen LLM weight {k} changed"
    assert not model.llm.training, "the frozen LLM left eval mode"
    modules = {k.rsplit(".", 1)[0] for k in trainable_before if k.split(".")[0] in TRAINABLE_MODULES}
    for prefix in modules:
        changed = any(
            not torch.equal(model.trainable_state_dict()[k], trainable_before[k])
            for k in trainable_before
            if k.startswith(prefix + ".") or k == prefix
        )
        assert changed, f"trainable module {prefix} did not change"
    report = model.param_report()
    assert report["llm"]["trainable"] == 0 and report["llm"]["frozen"] > 0


def test_gradients_reach_the_prefix_through_the_frozen_llm():
    cfg = make_cfg(*TINY)
    from hydra.utils import instantiate

    model = SimV0Model(dv=64, F=8, K=4, llm=instantiate(cfg.llm, _convert_="all"))
    batch = SyntheticSimDataset(num_samples=8).__getitems__(list(range(8)))
    model.train()
    out = model(batch)
    (out["risk_logits"].sum() + out["action_logits"].sum()).backward()
    for name in ("vis_proj.weight", "tel_mlp.0.weight", "query"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.llm.parameters())


def test_telemetry_statistics_come_from_the_train_split(tiny_run):
    run_dir, _, _ = tiny_run
    meta = load_checkpoint(run_dir / "checkpoints/last.pt")["metadata"]
    train = SyntheticSimDataset(split="train", num_samples=4096)
    tel = train.telemetry_array()
    assert meta["telemetry_mean"] == pytest.approx(tel.mean(0).tolist(), abs=1e-5)
    assert meta["telemetry_std"][6] == pytest.approx(tel.std(0)[6], abs=1e-5)  # speed


def test_train_command_on_a_cached_split_with_opt125m_architecture(synthetic_split, tmp_path):
    res = run_cmd(
        "train.py",
        "llm=opt125m",
        "llm.pretrained=false",
        "data=cached",
        f"data.train_split_path={synthetic_split}/train",
        f"data.val_split_path={synthetic_split}/val",
        "training.epochs=1",
        "data.batch_size=64",
        "training.progress_bar=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["metadata"]["d"] == 768 and ckpt["metadata"]["dv"] == 32
    assert ckpt["metadata"]["llm"]["arch"]["model_type"] == "opt"
    assert len(read_jsonl(tmp_path / "metrics/val_metrics.jsonl")) == 1


def test_dummy_and_custom_data_train(tmp_path, synthetic_split):
    from sim.training.train import train

    for name, extra in (
        (
            "dummy",
            [
                "data=dummy",
                "data.dataset_kwargs.dv=32",
                "data.train_kwargs.num_samples=64",
                "data.val_kwargs.num_samples=32",
            ],
        ),
        (
            "custom",
            [
                "data=custom",
                "data.dataset_class_path=custom_dataset.NpzRoverDataset",
                f"data.train_split_path={synthetic_split}/train",
                f"data.val_split_path={synthetic_split}/val",
            ],
        ),
    ):
        result = train(make_cfg(*TINY, "training.epochs=1", *extra), run_dir=tmp_path / name)
        assert result["best_epoch"] == 1 and (tmp_path / name / "checkpoints/best.pt").is_file()


def test_class_weights_auto_and_sample_weights(tmp_path):
    cfg = make_cfg(
        *TINY,
        "training.epochs=1",
        "model.class_weights=auto",
        "data.train_kwargs.num_samples=128",
        "data.val_kwargs.num_samples=64",
    )
    trainer = Trainer(cfg, RunDir(tmp_path))
    trainer.setup()
    counts = torch.bincount(torch.as_tensor(trainer.data.train.label_arrays()["risk"]), minlength=4).float()
    expected = counts.sum() / (4 * counts)
    assert torch.allclose(trainer.class_weights["risk"].cpu(), expected)
