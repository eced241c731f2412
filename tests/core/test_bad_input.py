"""Bad input and faults, one test per case: every malformed input refused clearly, nothing lost.

Samples (validation in the loader, data.on_bad_sample), `python -m sim check_data`, non-finite
losses and weights, config errors at start-up, damaged or foreign checkpoints, a full disk or an
unwritable output directory. The generated (property-based) cases are in tests/test_fuzz.py.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_cfg, run_cmd

from sim.core import labels as L
from sim.core.checkpoint import load_checkpoint, save_checkpoint
from sim.core.cli import compose
from sim.core.config import check_writable_dir, validate_config
from sim.core.errors import CheckpointError, ConfigError, DataError
from sim.core.run import RunDir
from sim.data.dataset import SimData, SimDataset
from sim.data.synthetic import generate, write_split
from sim.data.validate import SampleValidator, telemetry_stats
from sim.evaluation.metrics import compute_losses
from sim.models.model import SimV0Model
from sim.training.checkpointing import Checkpointer
from sim.training.guards import (
    NonFiniteError,
    NonFiniteGuard,
    OutputDirCheck,
    check_finite_state,
)
from sim.training.train import train

F, DV = 8, 16
BASE = [*TINY, "data.batch_size=16"]
SMALL = [*BASE, "data.train_kwargs.num_samples=64", "data.val_kwargs.num_samples=32"]  # data=synthetic
TINY_LLM = {
    "arch": {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "n_positions": 16,
        "vocab_size": 8,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "pretrained": False,
    "dtype": "float32",
}


class ListSplit(SimDataset):
    """A user-style dataset over a list of sample dicts (read one by one: the collate path)."""

    def __init__(self, samples):
        super().__init__(None, use_cached_vis_feats=True)
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def good_sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "vis_feats": torch.randn(F, DV, generator=g),
        "telemetry": torch.randn(8, generator=g),
        "risk_id": i % 4,
        "reason_id": i % 4,
        "action_id": i % 6,
        "sample_id": f"x{i}",
    }


def loader_of(samples, **kw):
    ds = ListSplit(samples)
    return SimData(train=ds, val=ds, batch_size=kw.pop("batch_size", 4), **kw).loader("train")


def small_split(root: Path, n_train: int = 64, n_val: int = 32) -> Path:
    for split, n in (("train", n_train), ("val", n_val)):
        write_split(root / split, generate(n, F, DV, 0, split), F, DV)
    return root


def cached(root: Path) -> list[str]:
    return ["data=cached", f"data.train_split_path={root}/train", f"data.val_split_path={root}/val"]


# ---- every sample the loader yields is validated ---------------------------------------------
def _set(key, value):
    def mutate(s):
        s[key] = value(s) if callable(value) else value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            _set("telemetry", lambda s: torch.tensor([0, 0, 0, 0, 0, 0, math.nan, 0.0])),
            r"sample 5 \(sample_id 'x5'\): telemetry has 1 non-finite value \(nan\) in v; expected 8 finite numbers",
        ),
        (
            lambda s: s.__setitem__("video", s.pop("vis_feats")),
            r"sample 5 \(sample_id 'x5'\): vis_feats is missing; expected keys vis_feats, telemetry, risk_id",
        ),
        (
            _set("vis_feats", torch.zeros(F - 1, DV)),
            r"sample 5 \(sample_id 'x5'\): vis_feats has shape \[7, 16\]; expected \[F=8, dv=16\]",
        ),
        (_set("vis_feats", torch.zeros(F, DV + 1)), r"vis_feats has shape \[8, 17\]; expected \[F=8, dv=16\]"),
        (
            _set("vis_feats", torch.zeros(F, DV, dtype=torch.int64)),
            r"vis_feats has dtype int64; expected floating point",
        ),
        (
            _set("vis_feats", lambda s: s["vis_feats"].index_fill(0, torch.tensor([2]), math.inf)),
            r"vis_feats has 16 non-finite values \(inf\); expected finite",
        ),
        (
            _set("risk_id", 4),
            r"sample 5 \(sample_id 'x5'\): risk_id is 4; expected an integer in 0..3 \(none, low, medium, high\)",
        ),
        (_set("action_id", 2.0), r"action_id is 2.0; expected an integer in 0..5"),
        (_set("reason_id", None), r"reason_id is None \(NoneType\); expected an integer in 0..3"),
        (_set("weight", -1.0), r"weight is -1.0; expected a finite float >= 0"),
        (_set("telemetry", [1.0] * 7), r"telemetry has shape \[7\]; expected \[8\]"),
    ],
)
def test_a_bad_sample_is_refused_naming_index_sample_id_key_and_expectation(mutate, message):
    samples = [good_sample(i) for i in range(8)]
    mutate(samples[5])
    with pytest.raises(DataError, match=message) as info:
        for _ in loader_of(samples):
            pass
    assert "data.on_bad_sample=skip" in str(info.value)  # and says what else can be done


def test_good_samples_pass_and_come_out_in_the_contract_types():
    samples = [good_sample(i) for i in range(6)]
    samples[1]["telemetry"] = samples[1]["telemetry"].double().numpy()[::-1].copy()  # NumPy float64: converted
    samples[2]["weight"] = 2
    batches = list(loader_of(samples))
    assert [b["vis_feats"].shape[0] for b in batches] == [4, 2]
    b = batches[0]
    assert b["vis_feats"].dtype == b["telemetry"].dtype == b["weight"].dtype == torch.float32
    assert all(b[f"{h}_id"].dtype == torch.long for h in L.HEADS)
    assert b["sample_id"] == ["x0", "x1", "x2", "x3"] and b["weight"].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_a_bad_row_of_a_cached_split_is_named_by_index_and_sample_id(tmp_path):
    root = small_split(tmp_path)
    feats = np.load(root / "train" / "vis_feats.npy")
    feats[9, 3, 1] = np.inf
    np.save(root / "train" / "vis_feats.npy", feats)
    cfg = make_cfg(*BASE, *cached(root))
    from hydra.utils import instantiate

    data = instantiate(cfg.data, use_cached_vis_feats=True, _convert_="all")
    assert sum(len(b["sample_id"]) for b in data.loader("val")) == 32
    with pytest.raises(
        DataError, match=r"sample 9 \(sample_id 'synth-train-0-000009'\): vis_feats has 1 non-finite value \(inf\)"
    ):
        for _ in data.loader("train", shuffle=True):
            pass


def test_the_message_from_a_loader_worker_is_the_message_not_a_traceback():
    samples = [good_sample(i) for i in range(6)]
    samples[4]["risk_id"] = 7
    with pytest.raises(DataError) as info:
        for _ in loader_of(samples, num_workers=1):
            pass
    text = str(info.value)
    assert (
        text.startswith("bad sample of the train split: sample 4 (sample_id 'x4'): risk_id is 7")
        and "Traceback" not in text
    )


def test_skip_drops_bad_samples_and_empties_whole_bad_batches_and_counts_them(tmp_path):
    samples = [good_sample(i) for i in range(10)]
    samples[0]["telemetry"][0] = math.nan
    samples[1]["action_id"] = 6  # batch 0 (samples 0, 1) has no good row at all
    del samples[6]["vis_feats"]
    loader = loader_of(samples, batch_size=2, on_bad_sample="skip")
    loader.skip_log.path = tmp_path / "skipped.txt"
    batches = list(loader)
    # One batch per sampler batch, the all-bad one empty: DDP ranks and resume positions count on it.
    assert len(batches) == len(loader) == 5 and batches[0] == {}
    assert [b["sample_id"] for b in batches[1:]] == [["x2", "x3"], ["x4", "x5"], ["x7"], ["x8", "x9"]]
    assert loader.skip_log.count == 3
    lines = (tmp_path / "skipped.txt").read_text().splitlines()
    assert lines[0] == "split\tindex\tsample_id\tkey\tproblem" and len(lines) == 4
    assert lines[3].startswith("train\t6\tx6\tvis_feats\tis missing")
    list(loader)  # a second epoch skips them again but lists them once
    assert len((tmp_path / "skipped.txt").read_text().splitlines()) == 4 and loader.skip_log.events == 6


def test_training_with_skip_lists_skipped_ids_in_the_run_logs(tmp_path):
    root = small_split(tmp_path / "data")
    tel = np.load(root / "train" / "telemetry.npy")
    tel[[3, 7], 2] = [np.nan, np.inf]
    np.save(root / "train" / "telemetry.npy", tel)
    with pytest.raises(DataError, match=r"sample (3|7) \(sample_id 'synth-train-0-00000(3|7)'\): telemetry"):
        train(make_cfg(*BASE, *cached(root), "training.epochs=1"), run_dir=tmp_path / "strict")
    assert not list((tmp_path / "strict" / "checkpoints").glob("*.pt"))

    result = train(
        make_cfg(*BASE, *cached(root), "training.epochs=1", "data.on_bad_sample=skip"), run_dir=tmp_path / "run"
    )
    assert result["best_epoch"] == 1
    listed = (tmp_path / "run" / "logs" / "skipped_samples.txt").read_text()
    assert "synth-train-0-000003\ttelemetry" in listed and "synth-train-0-000007\ttelemetry" in listed
    log = (tmp_path / "run" / "logs" / "stdout.log").read_text()
    assert "data.on_bad_sample=skip: skipped" in log and "2 of 64 train samples have non-finite telemetry" in log
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["metadata"]
    assert all(math.isfinite(x) for x in meta["telemetry_mean"] + meta["telemetry_std"])


def test_telemetry_statistics_leave_out_non_finite_rows():
    tel = np.array([[1.0] * 8, [3.0] * 8, [np.nan] + [1.0] * 7])
    mean, std = telemetry_stats(tel)
    assert mean.tolist() == [2.0] * 8 and std.tolist() == [1.0] * 8
    with pytest.raises(DataError, match="no sample of the train split has finite telemetry"):
        telemetry_stats(np.full((3, 8), np.inf))


def test_a_validator_checks_f_and_dv_of_the_config():
    batch = {
        "vis_feats": torch.zeros(2, F, DV),
        "telemetry": torch.zeros(2, 8),
        **{f"{h}_id": torch.zeros(2, dtype=torch.long) for h in L.HEADS},
        "sample_id": ["a", "b"],
    }
    checked = SampleValidator("vis_feats", F=F, dv=32).check_batch(batch, [10, 11])
    assert checked.batch is None
    assert [b.describe() for b in checked.bad] == [
        "sample 10 (sample_id 'a'): vis_feats has batch shape [2, 8, 16]; expected [B=2] + [F=8, dv=32]",
        "sample 11 (sample_id 'b'): vis_feats has batch shape [2, 8, 16]; expected [B=2] + [F=8, dv=32]",
    ]
    with pytest.raises(ConfigError, match=r"data\.on_bad_sample='drop'"):
        SampleValidator(on_bad_sample="drop")


# ---- python -m sim check_data ---------------------------------------------------------------------
def compose_check(*overrides: str):
    return compose("check_data", overrides)


def test_check_data_reports_a_clean_split_without_training():
    from sim.commands.check_data import check_data, format_report

    report = check_data(
        compose_check("data.train_kwargs.num_samples=50", "data.val_kwargs.num_samples=20", "split=train")
    )
    assert report["ok"] and list(report["splits"]) == ["train"]
    train_r = report["splits"]["train"]
    assert train_r["samples"] == train_r["good"] == 50 and train_r["bad"] == 0
    assert all(sum(counts.values()) == 50 for counts in train_r["labels"].values())
    assert train_r["telemetry"]["az"]["mean"] == pytest.approx(9.81, abs=0.05)  # gravity
    text = format_report(report)
    assert "result: OK, no bad samples" in text and "non-finite" in text


def test_check_data_command_lists_bad_samples_and_exits_non_zero(tmp_path):
    root = small_split(tmp_path)
    tel = np.load(root / "train" / "telemetry.npy")
    tel[3, 6] = np.nan
    np.save(root / "train" / "telemetry.npy", tel)
    feats = np.load(root / "val" / "vis_feats.npy")
    feats[5] = -np.inf
    np.save(root / "val" / "vis_feats.npy", feats)
    res = run_cmd("-m", "sim", "check_data", *cached(root), f"report={tmp_path}/report.json")
    assert res.returncode == 1, res.stderr
    out = res.stdout
    assert "sample 3 (sample_id 'synth-train-0-000003'): telemetry has 1 non-finite value (nan) in v" in out
    assert "sample 5 (sample_id 'synth-val-0-000005'): vis_feats has 128 non-finite values (-inf)" in out
    assert "result: 2 bad samples (train 1, val 1)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["splits"]["train"]["telemetry"]["v"]["nonfinite"] == 1 and report["splits"]["val"]["bad"] == 1


# ---- non-finite loss, gradients and weights -------------------------------------------------------
def test_guard_skips_and_counts_non_finite_steps_and_stops_after_too_many_in_a_row():
    p = torch.nn.Parameter(torch.zeros(3))
    guard = NonFiniteGuard(max_consecutive=3)

    def step(value: float) -> bool:
        p.grad = torch.full((3,), value)
        guard.observe_loss(torch.tensor(value))
        return guard.should_step([p])

    assert step(1.0)
    assert not step(math.nan) and not step(math.inf)
    assert step(1.0) and guard.consecutive == 0 and guard.skipped == 2  # a good step resets the run of faults
    assert not step(math.nan) and not step(math.nan)
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite loss \(nan\) in 3 consecutive steps \(training.max_nonfinite_steps=3; "
        r"5 of 7 steps skipped",
    ):
        step(math.nan)
    with pytest.raises(ConfigError, match=r"training\.max_nonfinite_steps=0"):
        NonFiniteGuard(0)


def _poisoned_loss(which):
    """A training loss that is NaN on the train steps `which(step)` selects (evaluation keeps its own)."""
    calls = {"n": 0}

    def poisoned(logits, batch, *args, **kwargs):
        losses = compute_losses(logits, batch, *args, **kwargs)
        calls["n"] += 1
        if which(calls["n"]):
            losses = {**losses, "objective": losses["objective"] * math.nan, "loss": losses["loss"] * math.nan}
        return losses

    return poisoned, calls


def test_non_finite_steps_are_skipped_and_the_run_goes_on(tmp_path, caplog):
    loss_fn, calls = _poisoned_loss(lambda n: n in (2, 3))
    result = train(make_cfg(*SMALL, "training.epochs=1"), run_dir=tmp_path, loss_fn=loss_fn)
    assert calls["n"] == 4 and result["best_epoch"] == 1
    assert "step 3: non-finite loss (nan); optimizer step skipped (2 in a row, 2 in all" in caplog.text
    train_m = json.loads((tmp_path / "metrics" / "train_metrics.jsonl").read_text().splitlines()[0])
    assert train_m["loss"] is not None and math.isfinite(train_m["loss"])  # the NaN batches stay out of the mean
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model_state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())


def test_too_many_non_finite_steps_stop_the_run_with_no_checkpoint(tmp_path):
    loss_fn, _ = _poisoned_loss(lambda n: True)
    with pytest.raises(NonFiniteError, match=r"training stopped: non-finite loss \(nan\) in 3 consecutive steps"):
        cfg = make_cfg(*SMALL, "training.epochs=1", "training.max_nonfinite_steps=3")
        train(cfg, run_dir=tmp_path, loss_fn=loss_fn)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert "training.max_nonfinite_steps=3" in (tmp_path / "logs" / "stdout.log").read_text()


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    class RuinsEpoch2(Checkpointer):
        def end_epoch(self, epoch, train, val, global_step):
            if epoch == 2:  # weights ruined between training and saving epoch 2
                with torch.no_grad():
                    self.state.model.vis_proj.weight[0, 0] = math.nan
            return super().end_epoch(epoch, train, val, global_step)

    cfg = make_cfg(*SMALL, "training.epochs=2")
    with pytest.raises(
        NonFiniteError, match=r"refusing to write the checkpoint: 1 tensor\(s\) hold NaN or inf \(vis_proj.weight\)"
    ):
        train(cfg, run_dir=tmp_path, checkpointer=RuinsEpoch2(RunDir(tmp_path), cfg))
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model_state_dict"].values())

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.state[model.weight]["momentum_buffer"][0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"optimizer state\[0\].momentum_buffer"):
        check_finite_state(model, opt)


# ---- config errors at start-up, naming the key ----------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr=0"),
        ("optim.lr=-0.001", "optim.lr=-0.001"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1"),
        ("optim.betas=[0.9]", "optim.betas="),
        ("optim.schedule=linear", "optim.schedule='linear'"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5"),
        ("model.loss_weights.risk=-1", "model.loss_weights.risk=-1"),
        ("+model.loss_weights.speed=1", "model.loss_weights.speed: unknown loss"),
        ("model.loss_weights={risk: 0, reason: 0, action: 0}", "model.loss_weights: risk, reason and action are all 0"),
        ("model.class_weights={risk: [1, 2]}", r"model.class_weights.risk=\[1, 2\]: expected 4 numbers"),
        ("model.head_hidden=-1", "model.head_hidden=-1"),
        ("model.dv=0", "model.dv=0"),
        ("data.on_bad_sample=ignore", "data.on_bad_sample='ignore': expected error"),
        ("training.max_nonfinite_steps=0", "training.max_nonfinite_steps=0"),
        ("training.device=gpu", "training.device='gpu'"),
        ("training.amp_dtype=int8", "training.amp_dtype='int8'"),
        ("checkpoint.mode=up", "checkpoint.mode='up'"),
        ("checkpoint.tie_breaker=accuracy", "checkpoint.tie_breaker='accuracy'"),
        (
            "vision=tiny",
            "vision=tiny encodes raw frames but data.dataset_class_path=sim.data.synthetic.SyntheticSimDataset",
        ),
        (
            "data=synthetic_frames",
            "vision=cached reads cached features but "
            "data.dataset_class_path=sim.data.synthetic_frames.SyntheticFramesDataset",
        ),
        (
            "data=cached|data.train_split_path=no/such/dir",
            r"split directory not found: no/such/dir \(data.train_split_path\)",
        ),
    ],
)
def test_a_config_that_cannot_work_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg(*TINY, *override.split("|")))


def test_cached_split_of_raw_frames_with_vision_cached_is_refused(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        np.save(tmp_path / split / "frames.npy", np.zeros((1, 1, 3, 2, 2), np.uint8))
    with pytest.raises(
        ConfigError, match=r"data.train_split_path=.* holds frames.npy, not the vis_feats.npy that vision=cached reads"
    ):
        validate_config(make_cfg(*TINY, *cached(tmp_path)))


def test_config_errors_come_before_anything_heavy_loads(tmp_path):
    # llm=gpt2 cannot load offline (LLMLoadError); the config error must come first, with nothing written.
    with pytest.raises(ConfigError, match=r"optim\.lr=0"):
        train(make_cfg("llm=gpt2", "optim.lr=0"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    validate_config(
        make_cfg("llm=gpt2")
    )  # without the bad key it is the LLM's turn (LLMLoadError, tests/test_errors.py)


# ---- checkpoints: damaged, foreign, unsafe, another architecture ---------------------------------
def tiny_model(dv: int = DV) -> SimV0Model:
    torch.manual_seed(0)
    return SimV0Model(llm=TINY_LLM, dv=dv, F=F, K=2, telemetry_hidden=16, head_hidden=0)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(path, {"model_state_dict": model.trainable_state_dict(), "metadata": model.metadata(), "epoch": 1})
    return path.read_bytes()


class NotPlainData:
    pass


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _flip(data: bytes, at: float) -> bytes:
    b = bytearray(data)
    i = int(len(b) * at)
    b[i : i + 8] = bytes(x ^ 0xFF for x in b[i : i + 8])
    return bytes(b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda good: good[: len(good) // 2], "is truncated or corrupt"),
        (lambda good: b"", "is truncated or corrupt"),
        (lambda good: _flip(good, 0.5), r"is corrupt: .* does not match its checksum"),  # damage inside tensor data
        (lambda good: os.urandom(4096), "corrupt"),
        (
            lambda good: _torch_bytes({"state_dict": {"w": torch.zeros(2)}}),
            r"is not a SIM checkpoint: expected keys \['model_state_dict', 'metadata'\], found \['state_dict'\]",
        ),
        (lambda good: _torch_bytes(torch.zeros(3)), "is not a SIM checkpoint: .* found Tensor"),
        (
            lambda good: _torch_bytes({"model_state_dict": {}, "metadata": {"format": "other.v1"}}),
            "metadata.format is 'other.v1', expected 'sim.v0'",
        ),
        (
            lambda good: _torch_bytes({"model_state_dict": {}, "metadata": NotPlainData()}),
            "only load with weights_only=False",
        ),
        (
            lambda good: _torch_bytes({"model_state_dict": {"w": np.zeros(3)}, "metadata": {}}),
            "only load with weights_only=False",
        ),
    ],
    ids=[
        "truncated",
        "empty",
        "bit-flip",
        "random-bytes",
        "foreign-dict",
        "bare-tensor",
        "other-format",
        "python-object",
        "numpy-array",
    ],
)
def test_a_bad_checkpoint_is_a_clear_checkpoint_error(tmp_path, good_checkpoint, make, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(make(good_checkpoint))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        SimV0Model.from_checkpoint(path)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, good_checkpoint):
    path = tmp_path / "good.pt"
    path.write_bytes(good_checkpoint)
    ckpt = load_checkpoint(path)
    other = tiny_model(dv=DV * 2)
    with pytest.raises(
        CheckpointError,
        match=r"another architecture: vis_proj.weight has shape \[32, 16\] in the checkpoint, "
        r"this model \(dv=32, d=32\) expects \[32, 32\]",
    ):
        other.load_state_dict(ckpt["model_state_dict"])
    with pytest.raises(CheckpointError, match="does not fit this model: missing"):
        tiny_model().load_state_dict({k: v for k, v in ckpt["model_state_dict"].items() if not k.startswith("heads")})
    # Metadata that lies about the architecture: rebuilt as it says, then the weights do not fit.
    lying = tmp_path / "lying.pt"
    save_checkpoint(lying, {**ckpt, "metadata": {**ckpt["metadata"], "dv": DV * 2}})
    with pytest.raises(CheckpointError, match="another architecture"):
        SimV0Model.from_checkpoint(lying)


# ---- a full disk, an unwritable output directory ---------------------------------------------------
class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, fd: int, *args, **kwargs):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, good_checkpoint, monkeypatch):
    import sim.core.checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(good_checkpoint)
    monkeypatch.setattr(sim.core.checkpoint.os, "fdopen", _FullDisk)
    with pytest.raises(
        CheckpointError,
        match=r"could not write checkpoint .*last.pt: No space left on device; the previous file is intact",
    ):
        save_checkpoint(path, {"model_state_dict": {}, "metadata": {}})
    assert path.read_bytes() == good_checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_an_unwritable_checkpoint_directory_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(
        CheckpointError,
        match=r"could not write checkpoint .*: File exists \(a part of the path is a file, not a directory\)",
    ):
        save_checkpoint(tmp_path / "file" / "last.pt", {"a": 1})
    import sim.core.checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(sim.core.checkpoint.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(tmp_path / "last.pt", {"a": 1})


def test_training_stops_cleanly_when_the_disk_fills_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    import sim.core.checkpoint

    def save_then_fill(path, payload):
        if payload["epoch"] >= 2:
            monkeypatch.setattr(sim.core.checkpoint.os, "fdopen", _FullDisk)
        return save_checkpoint(path, payload)

    cfg = make_cfg(*SMALL, "training.epochs=2")
    with pytest.raises(CheckpointError, match="No space left on device; the previous file is intact"):
        train(cfg, run_dir=tmp_path, checkpointer=Checkpointer(RunDir(tmp_path), cfg, write=save_then_fill))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_an_unwritable_run_dir_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = run_cmd("train.py", *TINY, f"hydra.run.dir={blocker}/run")
    assert res.returncode == 1
    assert f"error: hydra.run.dir={blocker}/run: {blocker} is a file, not a directory" in res.stderr
    assert "Traceback" not in res.stderr

    assert check_writable_dir(tmp_path / "new" / "run", "hydra.run.dir") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked without creating anything
    import sim.core.config

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sim.core.config.tempfile, "TemporaryFile", full)
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*: cannot write in .* \(no space left on the device\)"):
        check_writable_dir(tmp_path / "run", "hydra.run.dir")
    from omegaconf import OmegaConf

    with pytest.raises(SystemExit):  # the Hydra callback behind hydra.callbacks.output_dir_check
        OutputDirCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "run")}}}))
    assert "error: hydra.run.dir=" in capsys.readouterr().err
