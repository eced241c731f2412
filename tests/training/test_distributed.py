"""torchrun: one run tree for all ranks, every val sample exactly once, metrics summed over ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import PRECISIONS, ROOT, TINY, make_cfg, write_cached_split

from sim.core.labels import METRIC_NAMES
from sim.core.run import RunDir, read_jsonl
from sim.training.distributed import ShardSampler, sum_over_ranks
from sim.training.train import train
from sim.training.trainer import Trainer

# Small and odd on purpose: 65 val samples over 2 ranks is 33 + 32, batches of 16 give 3 + 2 batches.
DATA = ["data.train_kwargs.num_samples=160", "data.val_kwargs.num_samples=65", "training.epochs=2"]
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LOSSES = [m for m in METRIC_NAMES if m.startswith("loss")]
COUNTED = [m for m in METRIC_NAMES if not m.startswith("loss")]  # from confusion matrices: exact


@pytest.mark.parametrize("n", [1, 2, 7, 64, 65])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_shards_deal_every_sample_exactly_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    dealt = sorted(i for s in shards for i in s)
    assert dealt == list(range(n)), "a sample is missing or counted twice"
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_shards_are_even_and_resume_where_they_stopped(world):
    n, seed = 50, 7
    samplers = [ShardSampler(n, r, world, shuffle=True, seed=seed, even=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(3)
    full = [list(s) for s in samplers]
    assert len({len(f) for f in full}) == 1, "ranks would take different numbers of steps"
    assert len({i for f in full for i in f}) == n // world * world, "a sample is dealt twice in one epoch"
    # Another epoch, another order; the same epoch, the same order (what a resumed run relies on).
    other = ShardSampler(n, 0, world, shuffle=True, seed=seed, even=True)
    other.set_epoch(4)
    assert list(other) != full[0]
    # After k samples per rank, the rest of the epoch starts at global position k * world.
    k = 5
    for r, s in enumerate(samplers):
        s.set_epoch(3, start=k * world)
        assert list(s) == full[r][k:]


def test_resuming_on_another_world_size_skips_exactly_what_was_consumed():
    n, seed = 48, 1
    order = ShardSampler(n, 0, 1, shuffle=True, seed=seed)
    order.set_epoch(2)
    order = list(order)
    two = [ShardSampler(n, r, 2, shuffle=True, seed=seed, even=True) for r in range(2)]
    for s in two:
        s.set_epoch(2)
    consumed = [i for s in two for i in list(s)[:6]]  # 6 samples on each of 2 ranks
    three = [ShardSampler(n, r, 3, shuffle=True, seed=seed, even=True) for r in range(3)]
    for s in three:
        s.set_epoch(2, start=12)
    rest = [i for s in three for i in s]
    assert sorted(consumed + rest) == sorted(order) and not set(consumed) & set(rest)


def test_sums_are_the_identity_in_one_process():
    tree = {"b": [1.5, 2], "a": torch.ones(2, 2, dtype=torch.long)}
    assert sum_over_ranks(tree) is tree


def _run_tree(root):
    # A TensorBoard event file is named by its time, host and pid: what must match is how many there are
    # (one: only rank 0 logs).
    return sorted(
        re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", str(p.relative_to(root)))
        for p in root.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "training_curves.png"
    )


# How far a 2-process run's logged train losses may drift from one process's with the same global
# batch, per precision (README "Distributed training"): DDP averages the ranks' gradients in another
# order than one process summing the whole batch, so the weights differ in their last bits. In fp32
# that stays in the last digits; under bf16 autocast those bits can flip the rounding of an
# activation, and the confidence head's target (is the action's arg-max right?) flips with it.
TRAIN_LOSS_RTOL = {"fp32": 1e-4, "bf16": 5e-2}


@pytest.mark.slow  # several processes, each importing torch and transformers
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_torchrun_two_processes_write_one_run_tree_with_exact_val_metrics(tmp_path, precision):
    """The real command: 2 gloo processes, no hydra.run.dir given (each rank resolves the default)."""
    common = [*TINY, *PRECISIONS[precision], *DATA]
    # Same samples per optimizer step: 2 ranks x 8 against 1 process x 16.
    ddp = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *common,
            "data.batch_size=8",
        ],
        cwd=tmp_path,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        single_run = tmp_path / "single"
        train(make_cfg(*common, "data.batch_size=16"), run_dir=single_run)
        out, _ = ddp.communicate(timeout=300)
    finally:
        ddp.kill()
    assert ddp.returncode == 0, out[-3000:]

    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"one run scattered over {runs}"
    run = runs[0]
    assert len(list(run.glob(".hydra/*.yaml"))) == 3
    assert _run_tree(run) == _run_tree(single_run)
    log_text = (run / "logs/stdout.log").read_text()
    assert "8 per process x 1 accumulation step(s) x 2 process(es) = 16 samples per optimizer step" in log_text
    assert "process group: rank 0 of 2" in log_text

    # DDP averages the two ranks' gradients: the same steps as one process with the whole batch.
    for split in ("train", "val"):
        a, b = (
            read_jsonl(run / f"metrics/{split}_metrics.jsonl"),
            read_jsonl(single_run / f"metrics/{split}_metrics.jsonl"),
        )
        assert [r["epoch"] for r in a] == [1, 2] == [r["epoch"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            for k in LOSSES:
                assert ra[k] == pytest.approx(rb[k], rel=TRAIN_LOSS_RTOL[precision]), (split, k)

    # Val metrics of the torchrun run = one process evaluating its last checkpoint on the whole split.
    cfg = make_cfg(*common, "data.batch_size=16")
    trainer = Trainer(cfg, RunDir(tmp_path / "eval"))
    trainer.setup()
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    trainer.model.load_state_dict(ckpt["model_state_dict"])
    mine = trainer.evaluate(trainer.loaders.val, "val", epoch=2)
    assert trainer.val_metrics.samples == 65
    theirs = read_jsonl(run / "metrics/val_metrics.jsonl")[-1]
    for k in COUNTED:
        assert theirs[k] == mine[k], k
    for k in LOSSES:  # the same weights on the same samples: exact in either precision
        assert theirs[k] == pytest.approx(mine[k], rel=1e-6, abs=1e-6), k


@pytest.mark.slow  # several processes, each importing torch and transformers
def test_torchrun_rank_losing_a_whole_batch_to_skipped_samples_keeps_in_step(tmp_path):
    n, seed, batch = 64, 7, 4
    rank0 = ShardSampler(n, 0, 2, shuffle=True, seed=seed, even=True)
    rank0.set_epoch(1)
    # Rank 0's third batch of epoch 1 is all bad: without its (empty) micro-step rank 0 would take one
    # optimizer step fewer, and rank 1 would wait for it in DDP's gradient all-reduce.
    bad = list(rank0)[2 * batch : 3 * batch]
    common = [
        *TINY,
        *write_cached_split(tmp_path / "data", n, 32, bad),
        "data.on_bad_sample=skip",
        f"data.batch_size={batch}",
        f"training.seed={seed}",
        "training.epochs=2",
        "checkpoint.every_n_steps=3",
        "llm.dtype=float32",
        "training.amp=false",
    ]
    run = tmp_path / "run"
    # A session of its own, so that a hung run's ranks can be stopped with their launcher.
    ddp = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *common,
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = ddp.communicate(timeout=240)
    finally:
        if ddp.poll() is None:
            os.killpg(ddp.pid, signal.SIGKILL)
            ddp.wait()
    assert ddp.returncode == 0, out[-3000:]

    steps_per_epoch = n // 2 // batch
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["state"]["global_step"] == 2 * steps_per_epoch
    log_text = (run / "logs/stdout.log").read_text()
    # Positions count what the sampler dealt (2 ranks x 4 per step), the empty batch included.
    assert "checkpoint at step 3 (epoch 1, 24 of its samples done)" in log_text
    assert "data.on_bad_sample=skip: skipped" in log_text
    assert [r["epoch"] for r in read_jsonl(run / "metrics/train_metrics.jsonl")] == [1, 2]


def test_slurm_launcher_config_composes_and_builds():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate

    from sim.core.cli import compose

    cfg = compose(
        "train",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.gpus_per_node=4",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.tasks_per_node, launcher.max_num_timeout) == ("gpu", 4, 3)
    built = instantiate(launcher)  # what Hydra does before submitting (nothing is submitted here)
    assert built.params["partition"] == "gpu" and built.params["timeout_min"] == 1440


def test_a_slurm_task_becomes_a_torchrun_rank(monkeypatch):
    pytest.importorskip("submitit")
    from sim.training import distributed

    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARS and not k.startswith("SLURM_")}
    env.update(
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="8",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
    )
    monkeypatch.setattr(os, "environ", env)
    distributed._export_slurm_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu07")
    assert distributed.launched()
