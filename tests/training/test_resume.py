"""Exact resume after SIGKILL, checkpoints that survive a kill mid-write, and resume config checks."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, make_cfg, write_cached_split

from sim.core.checkpoint import load_checkpoint
from sim.core.errors import CheckpointError
from sim.core.run import RunDir, read_jsonl
from sim.training.checkpointing import rng_state, set_rng_state
from sim.training.distributed import ShardSampler
from sim.training.train import train
from sim.training.trainer import Trainer

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# With 192 train samples: 3 epochs of 12 optimizer steps (2 micro-batches of 8 each), a cosine schedule
# with warm-up, and a mid-epoch last.pt every 4 steps.
RESUME_STEPS = [
    "data.batch_size=8",
    "training.grad_accum=2",
    "training.epochs=3",
    "checkpoint.every_n_steps=4",
    "optim.schedule=cosine",
    "optim.warmup_steps=3",
]
RESUME_RUN = [*TINY, "data.train_kwargs.num_samples=192", "data.val_kwargs.num_samples=64", *RESUME_STEPS]
PRECISIONS = {"fp32": ["llm.dtype=float32", "training.amp=false"], "bf16": ["llm.dtype=bfloat16", "training.amp=true"]}


def _train(run_dir: Path, *overrides: str, base: list[str] = RESUME_RUN) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *base, f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _progress(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)["state"]["progress"]
    except FileNotFoundError:
        return None


def _without_timing(records: list[dict]) -> list[dict]:
    # samples_per_s measures the wall clock: it differs between any two runs.
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def _kill_inside_epoch_2(victim: subprocess.Popen, last: Path) -> dict:
    """SIGKILL the run at the first checkpoint it writes inside epoch 2; that checkpoint's progress."""
    try:
        seen = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert victim.poll() is None, (
                "the run finished before it could be killed:\n" + victim.communicate()[0][-2000:]
            )
            stamp = last.stat().st_mtime_ns if last.exists() else None
            if stamp != seen:
                seen = stamp
                progress = _progress(last)
                if progress and progress["epoch"] == 2:
                    break
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        victim.kill()
    progress = _progress(last)
    assert progress is not None and progress["epoch"] == 2, (
        f"not killed inside epoch 2 (checkpoint progress {progress})"
    )
    return progress


def _assert_same_as_uninterrupted(ref_dir: Path, run_dir: Path) -> None:
    ref, got = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (ref_dir, run_dir))
    assert got["epoch"] == ref["epoch"] == 3 and got["state"]["progress"] is None
    assert got["state"]["global_step"] == ref["state"]["global_step"] == 36
    assert ref["model_state_dict"].keys() == got["model_state_dict"].keys()
    for k, v in ref["model_state_dict"].items():
        assert torch.equal(v, got["model_state_dict"][k]), f"weight {k} differs from the uninterrupted run"
    for pid, state in ref["optimizer_state_dict"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, got["optimizer_state_dict"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert got["scheduler_state_dict"] == ref["scheduler_state_dict"]
    for split in ("train", "val"):
        a = read_jsonl(ref_dir / "metrics" / f"{split}_metrics.jsonl")
        b = read_jsonl(run_dir / "metrics" / f"{split}_metrics.jsonl")
        assert [r["epoch"] for r in b] == [1, 2, 3], "duplicated or lost metric lines"
        assert _without_timing(b) == _without_timing(a), f"{split} metrics differ from the uninterrupted run"
    assert (
        torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]
        == torch.load(ref_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    )


@pytest.mark.slow  # several processes, each importing torch and transformers
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = _train(ref_dir)
    progress = _kill_inside_epoch_2(_train(run_dir), run_dir / "checkpoints" / "last.pt")
    assert 0 < progress["position"] < 192
    # A crash can also come between appending an epoch's metric lines and writing its checkpoint, or
    # in the middle of a line: the resumed run must drop both.
    for split in ("train", "val"):
        f = run_dir / "metrics" / f"{split}_metrics.jsonl"
        assert len(read_jsonl(f)) == 1
        with open(f, "a") as fh:
            fh.write(json.dumps({**read_jsonl(f)[0], "epoch": 2}) + "\n" + '{"epoch": 3, "lo')

    out = _finish(_train(run_dir, "training.resume=auto"))
    assert "resumed from" in out and "continuing at epoch 2, sample" in out
    _finish(reference)
    _assert_same_as_uninterrupted(ref_dir, run_dir)


@pytest.mark.slow  # several processes, each importing torch and transformers
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigkill_mid_epoch_then_resume_is_bit_identical_with_skipped_samples(tmp_path, precision):
    seed = 7
    sampler = ShardSampler(192, shuffle=True, seed=seed)
    sampler.set_epoch(2)
    order = sampler.order().tolist()
    # Epoch 2 (micro-batches of 8, 2 per step) loses its second micro-batch whole, then both of its
    # third step, before its first checkpoint; elsewhere these samples only thin out their batches.
    bad = order[8:16] + order[32:48]
    base = [
        *TINY,
        *write_cached_split(tmp_path / "data", 192, 64, bad),
        "data.on_bad_sample=skip",
        f"training.seed={seed}",
        *RESUME_STEPS,
        *PRECISIONS[precision],
    ]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = _train(ref_dir, base=base)
    last = run_dir / "checkpoints" / "last.pt"
    progress = _kill_inside_epoch_2(_train(run_dir, base=base), last)
    # The position is in samples of the epoch's order the sampler dealt (16 per step), skipped or not.
    steps_in_epoch = torch.load(last, weights_only=True)["state"]["global_step"] - 12
    assert progress["position"] == steps_in_epoch * 16 and 0 < progress["position"] < 192

    out = _finish(_train(run_dir, "training.resume=auto", base=base))
    assert "resumed from" in out and "data.on_bad_sample=skip: skipped" in out
    _finish(reference)
    _assert_same_as_uninterrupted(ref_dir, run_dir)
    assert sorted(
        int(line.split("\t")[1]) for line in (ref_dir / "logs" / "skipped_samples.txt").read_text().splitlines()[1:]
    ) == sorted(bad)


# Runs train.py with os.replace stalled for last.pt once a previous last.pt exists: the new checkpoint
# is then half written in its temporary file, the moment a SIGKILL arrives.
STALL_IN_SAVE = """
import os, runpy, sys, time
from pathlib import Path
rename = os.replace
def stalled(src, dst, *args, **kwargs):
    if Path(dst).name == "last.pt" and Path(dst).exists():
        with open(src, "r+b") as fh:
            fh.truncate(os.path.getsize(src) // 2)
        Path(os.environ["STALLED_MARKER"]).write_text(str(src))
        time.sleep(600)
    return rename(src, dst, *args, **kwargs)
os.replace = stalled
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # several processes, each importing torch and transformers
def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_last_pt(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "stalled"
    overrides = [
        *TINY,
        "data.train_kwargs.num_samples=64",
        "data.val_kwargs.num_samples=32",
        "data.batch_size=16",
        "training.epochs=2",
        "checkpoint.every_n_steps=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL_IN_SAVE, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, **ENV, "STALLED_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, (
                "the run ended without writing a second checkpoint:\n" + proc.communicate()[0][-2000:]
            )
            assert time.monotonic() < deadline, "no checkpoint write stalled"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()

    torn = Path(marker.read_text())
    assert torn.exists() and torn.parent == run_dir / "checkpoints", "the half-written checkpoint should be left over"
    with pytest.raises(Exception):  # noqa: B017 (the error type depends on where the file is torn)
        torch.load(torn, weights_only=True)  # what last.pt would be had it been written in place
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["state"]["global_step"] == 1 and ckpt["state"]["progress"]["epoch"] == 1

    train(make_cfg(*overrides, "training.resume=auto"), run_dir=run_dir)
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "the torn temporary file was not cleaned up"
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics" / "val_metrics.jsonl")] == [1, 2]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, path)
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected


SMALL = [
    *TINY,
    "data.train_kwargs.num_samples=64",
    "data.val_kwargs.num_samples=32",
    "data.batch_size=32",
    "training.epochs=1",
]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch")
    train(make_cfg(*SMALL), run_dir=run_dir)
    return run_dir


def _resume(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(make_cfg(*SMALL, "training.resume=auto", *overrides), RunDir(run_dir))
    trainer.setup()
    return trainer


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.K=2", "K is 4 there, 2 in this config"),
        ("model.head_hidden=64", "head_hidden is 256 there, 64"),
        ("llm.arch.n_layer=3", "trained on another LLM"),
    ],
)
def test_resume_refuses_what_cannot_continue(one_epoch_run, override, message):
    with pytest.raises(CheckpointError, match=message):
        _resume(one_epoch_run, override)


def test_resume_warns_where_the_config_changed_harmlessly(one_epoch_run, caplog):
    with caplog.at_level(logging.WARNING, logger="sim.training.checkpointing"):
        trainer = _resume(one_epoch_run, "training.epochs=2", "optim.lr=5e-4")
    text = caplog.text
    assert "training.epochs was 1, now 2" in text
    assert "optim.lr was 0.001, now 0.0005; the restored optimizer and LR schedule keep the checkpoint's value" in text
    assert trainer.start_epoch == 2 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert len(trainer.history["val"]) == 1


def test_resume_of_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        _resume(tmp_path, f"training.resume={tmp_path / 'nowhere.pt'}")
    # auto without a last.pt starts afresh, and drops metric lines of an attempt that left no checkpoint
    run = RunDir(tmp_path / "fresh")
    run.metrics_file("val").write_text('{"epoch": 1, "loss": 1.0}\n')
    trainer = _resume(run.root)
    assert trainer.start_epoch == 1 and read_jsonl(run.metrics_file("val")) == []


def test_resume_from_another_run_directory_brings_its_history(one_epoch_run, tmp_path):
    trainer = _resume(tmp_path / "continued", f"training.resume={one_epoch_run}", "training.epochs=2")
    assert trainer.start_epoch == 2
    for split in ("train", "val"):
        assert read_jsonl(tmp_path / "continued" / "metrics" / f"{split}_metrics.jsonl") == read_jsonl(
            one_epoch_run / "metrics" / f"{split}_metrics.jsonl"
        )
    assert trainer.fit()["best_epoch"] in (1, 2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "continued" / "metrics" / "val_metrics.jsonl")] == [1, 2]
