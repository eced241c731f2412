"""Checkpoints of a training run: what they hold, when they are written, and exact resume.

last.pt (written each epoch and every `checkpoint.every_n_steps` optimizer steps) holds the model,
optimizer, scaler and LR schedule, every RNG state, the position inside the epoch and the partial
epoch's metric sums; best.pt follows `BestEpochRule`. The metric files are part of that state: a run
starting fresh empties them, a resumed one keeps exactly the epochs its checkpoint completed.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sim.core.checkpoint import atomic_write_bytes, load_checkpoint, remove_stale_temporaries, save_checkpoint
from sim.core.errors import CheckpointError, ConfigError
from sim.core.run import RunDir, append_jsonl, read_jsonl
from sim.evaluation.metrics import EpochMetrics
from sim.evaluation.selection import BestEpochRule
from sim.models.model import SimV0Model
from sim.training import distributed as D
from sim.training.guards import check_finite_state

log = logging.getLogger(__name__)

History = dict[str, list[dict[str, Any]]]


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as plain lists and tensors (loads with weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "python": [version, list(mt), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where this machine has as many GPUs)."""
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"].numpy(), dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint holds the RNG states of %d GPUs, this machine has %d: CUDA RNGs not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


@dataclass(frozen=True)
class CheckpointSettings:
    rule: BestEpochRule  # which epoch best.pt holds
    save_every_epoch: bool  # also write checkpoints/epoch_NNN.pt
    every_n_steps: int  # also write last.pt every N optimizer steps inside an epoch (0: epoch ends only)

    @classmethod
    def from_config(cls, checkpoint: Mapping[str, Any]) -> CheckpointSettings:
        """From the `checkpoint` config node.

        Raises:
            ConfigError: a negative every_n_steps, or a bad best-epoch rule.
        """
        every = int(checkpoint.get("every_n_steps") or 0)
        if every < 0:
            raise ConfigError(f"checkpoint.every_n_steps={every} must be >= 0 (0 or null: only at epoch ends)")
        return cls(BestEpochRule.from_config(checkpoint), bool(checkpoint.get("save_every_epoch")), every)


@dataclass
class TrainingState:
    """The live objects a checkpoint saves and a resume restores, and the batch geometry it records."""

    model: SimV0Model
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler, or None
    scaler: torch.amp.GradScaler
    batch_size: int  # per process
    grad_accum: int


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: the epoch, the optimizer steps already taken, and (inside an epoch) the
    position a checkpoint written mid-epoch recorded (see `Checkpointer.save_progress`)."""

    start_epoch: int = 1
    global_step: int = 0
    progress: dict[str, Any] | None = None


class Checkpointer:
    """Owns a run's checkpoints, its best-epoch choice and its metric files.

    Every rank calls every method (they hold collectives); only rank 0 writes. `write` is how a
    checkpoint reaches the disk (atomic by default).
    """

    def __init__(
        self, run: RunDir, cfg: DictConfig, write: Callable[[Path, dict[str, Any]], None] = save_checkpoint
    ) -> None:
        self.run, self.cfg, self.write = run, cfg, write
        self.settings = CheckpointSettings.from_config(cfg.checkpoint)
        self.rule = self.settings.rule
        self.dist = D.DistEnv()
        self.best_key: tuple[float, ...] = ()  # BestEpochRule.key of the best epoch (none before the first)
        self.best_epoch = 0
        self.best: dict[str, Any] | None = None  # its val metrics
        self.history: History = {"train": [], "val": []}
        self.state: TrainingState | None = None

    def start(self, state: TrainingState, dist: D.DistEnv, resume: str | None) -> ResumePoint:
        """Take charge of a run's state: resume it as `training.resume` says, or empty the metric files.

        Raises:
            CheckpointError: no such checkpoint (an explicit path), or one this config cannot continue.
        """
        self.state, self.dist = state, dist
        if dist.is_main:
            for directory in (self.run.checkpoints, self.run.metrics):
                remove_stale_temporaries(directory)  # left by a run killed mid-write
        point = self._resume(resume) if resume else None
        if point is None:
            self._restart_metric_files()
            return ResumePoint()
        self.best = self._val_of(self.best_epoch)
        if self.best_epoch and len(self.best_key) != len(self.rule.key({})):
            # A checkpoint from before the floors: rank its best epoch anew (unknown: the next epoch wins).
            self.best_key = self.rule.key(self.best) if self.best is not None else ()
        return point

    # ---- writing --------------------------------------------------------------------------------
    def payload(
        self, epoch: int, metrics: dict[str, Any], global_step: int, progress: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """What a checkpoint holds (the format CONTRACT.md describes). Gathers the ranks' RNG states.

        Args:
            epoch: the last completed epoch.
            metrics: its val metrics.
            progress: where training stands inside the next epoch (None at an epoch's end).
        """
        s = self._state()
        check_finite_state(s.model, s.optimizer)  # never replace a good checkpoint with NaN weights
        return {
            "model_state_dict": s.model.trainable_state_dict(),
            "optimizer_state_dict": s.optimizer.state_dict(),
            "scheduler_state_dict": None if s.scheduler is None else s.scheduler.state_dict(),
            "scaler_state_dict": s.scaler.state_dict(),
            "epoch": int(epoch),
            "metrics": metrics,
            "metadata": s.model.metadata(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "state": {
                "global_step": global_step,
                "best_key": list(self.best_key),
                "best_epoch": self.best_epoch,
                "world_size": self.dist.world_size,
                "rng": D.gather_objects(rng_state()),  # one entry per rank
                "progress": progress,
            },
        }

    def end_epoch(self, epoch: int, train: dict[str, Any], val: dict[str, Any], global_step: int) -> tuple[bool, str]:
        """Record an epoch's metrics, judge it against the best so far and write its checkpoints.

        Returns:
            Whether it is the best epoch now, and the rule's reason.
        """
        if self.dist.is_main:
            append_jsonl(self.run.metrics_file("train"), train)
            append_jsonl(self.run.metrics_file("val"), val)
        self.history["train"].append(train)
        self.history["val"].append(val)
        is_best, key, why = self.rule.judge(epoch, val, self.best_key, self.best_epoch, self.best)
        if is_best:
            self.best_key, self.best_epoch, self.best = key, epoch, val
        payload = self.payload(epoch, val, global_step)
        if self.dist.is_main:
            if self.settings.save_every_epoch:
                self.write(self.run.checkpoints / f"epoch_{epoch:03d}.pt", payload)
            if is_best:
                self.write(self.run.best, payload)
            # last.pt is written after best.pt: a resumed run never finds a last newer than its best.
            self.write(self.run.last, payload)
        return is_best, why

    def progress_due(self, global_step: int) -> bool:
        """Whether last.pt is due after this optimizer step (checkpoint.every_n_steps)."""
        every = self.settings.every_n_steps
        return bool(every) and global_step % every == 0

    def save_progress(
        self, epoch: int, position: int, micro: int, elapsed: float, metrics: EpochMetrics, global_step: int
    ) -> None:
        """last.pt inside an epoch, after `micro` micro-batches on each rank.

        Args:
            position: samples of the epoch's order consumed by all ranks together.
            elapsed: training seconds spent in the epoch so far (for its samples_per_s).
            metrics: this rank's train metrics of the epoch so far.
        """
        s = self._state()
        progress = {
            "epoch": int(epoch),
            "position": int(position),
            "micro": int(micro),
            "elapsed": float(elapsed),
            "batch_size": s.batch_size,
            "grad_accum": s.grad_accum,
            # The partial epoch's sums over all ranks, so its train metrics come out as if uninterrupted.
            "train_metrics": D.sum_over_ranks(metrics.state()),
        }
        last_val = self.history["val"][-1] if self.history["val"] else {}
        payload = self.payload(epoch - 1, last_val, global_step, progress)
        if self.dist.is_main:
            self.write(self.run.last, payload)
            log.info(
                "checkpoint at step %d (epoch %d, %d of its samples done): %s",
                global_step,
                epoch,
                position,
                self.run.last,
            )

    # ---- resuming -------------------------------------------------------------------------------
    def _resume(self, resume: str) -> ResumePoint | None:
        """Continue from last.pt: training state, RNGs, the position in the epoch, the metric files.
        None where `auto` finds no checkpoint yet."""
        s = self._state()
        path = resume_path(resume, self.run)
        found = D.broadcast_object(path.is_file() if self.dist.is_main else None)
        if not found:
            if resume == "auto":
                log.info("training.resume=auto: no %s yet, starting fresh", path)
                return None
            raise CheckpointError(f"training.resume={resume}: checkpoint not found: {path}")
        ckpt, error = D.broadcast_object(_load_or_error(path) if self.dist.is_main else None)
        if error is not None:
            raise CheckpointError(error)
        check_resumable(ckpt, path, s.model)
        warn_config_changes(ckpt, path, self.cfg, self.dist.world_size, s.batch_size * s.grad_accum)
        s.model.load_state_dict(ckpt["model_state_dict"])
        s.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        if s.scheduler is not None and ckpt.get("scheduler_state_dict"):
            s.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        if ckpt.get("scaler_state_dict"):
            s.scaler.load_state_dict(ckpt["scaler_state_dict"])
        state = ckpt.get("state") or {}
        done = int(ckpt["epoch"])
        self.best_key = tuple(state.get("best_key", self.best_key))
        self.best_epoch = int(state.get("best_epoch", 0))
        self._restore_rng(state)
        self.history = D.broadcast_object(self._rewrite_metric_files(done, path) if self.dist.is_main else None)
        progress = state.get("progress")
        point = ResumePoint(
            int(progress["epoch"]) if progress else done + 1, int(state.get("global_step", 0)), progress
        )
        where = f", sample {progress['position']} of its order" if progress else ""
        log.info(
            "resumed from %s (step %d): continuing at epoch %d%s", path, point.global_step, point.start_epoch, where
        )
        return point

    def _restore_rng(self, state: dict[str, Any]) -> None:
        states = state.get("rng")
        if not states:  # a checkpoint from before per-rank RNG states: the torch one only
            if state.get("torch_rng") is not None:
                torch.set_rng_state(state["torch_rng"])
            return
        if len(states) != self.dist.world_size:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: every rank takes rank 0's RNG states",
                len(states),
                self.dist.world_size,
            )
        set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])

    def _restart_metric_files(self) -> None:
        """A run starting from scratch owns its metric files: lines of an earlier attempt are dropped."""
        if not self.dist.is_main:
            return
        stale = sum(len(read_jsonl(self.run.metrics_file(s))) for s in ("train", "val"))
        if stale:
            log.warning(
                "%s holds %d metric lines of an earlier run that did not leave a checkpoint to resume from "
                "(or training.resume is unset); they are replaced by this run's",
                self.run.metrics,
                stale,
            )
            for split in ("train", "val"):
                atomic_write_bytes(self.run.metrics_file(split), b"")

    def _rewrite_metric_files(self, done: int, ckpt_path: Path) -> History:
        """Make the metric files hold exactly the epochs the checkpoint has completed, and return them.

        Lines of later epochs (written after the checkpoint, before the crash) are dropped; they
        will be written again. A checkpoint from another run directory brings that run's lines.
        """
        source = self.run
        other = ckpt_path.resolve().parent.parent
        if ckpt_path.parent.name == "checkpoints" and other != self.run.root.resolve() and (other / "metrics").is_dir():
            source = RunDir(other, create=False)
        history: History = {}
        for split in ("train", "val"):
            records = read_jsonl(source.metrics_file(split))
            kept = [r for r in records if int(r.get("epoch", 0)) <= done]
            if len({r.get("epoch") for r in kept}) < done:
                log.warning(
                    "%s holds %d of the %d epochs the checkpoint completed", source.metrics_file(split), len(kept), done
                )
            atomic_write_bytes(self.run.metrics_file(split), "".join(json.dumps(r) + "\n" for r in kept).encode())
            history[split] = kept
        return history

    def _val_of(self, epoch: int) -> dict[str, Any] | None:
        return next((m for m in self.history["val"] if m.get("epoch") == epoch), None)

    def _state(self) -> TrainingState:
        if self.state is None:
            raise RuntimeError("Checkpointer.start() has not been called")
        return self.state


def resume_path(resume: str, run: RunDir) -> Path:
    """The checkpoint `training.resume` names: auto (this run's last.pt), a run directory or a file."""
    if resume == "auto":
        return run.last
    path = Path(resume)
    if path.is_dir():  # a run directory
        return path / "checkpoints" / "last.pt"
    return path


def check_resumable(ckpt: dict[str, Any], path: Path, model: SimV0Model) -> None:
    """Refuse a checkpoint of another architecture or LLM; warn where the model differs harmlessly.

    Raises:
        CheckpointError: dims or the LLM differ.
    """
    meta, mine = ckpt["metadata"], model.metadata()
    for key in ("dv", "d", "F", "K", "use_cached_vis_feats", "telemetry_hidden", "head_hidden"):
        if key in meta and meta.get(key) != mine.get(key):
            raise CheckpointError(
                f"cannot resume from {path}: {key} is {meta.get(key)!r} there, {mine.get(key)!r} in this config"
            )
    theirs = {k: v for k, v in (meta.get("llm") or {}).items() if k != "dtype"}
    ours = {k: v for k, v in (mine.get("llm") or {}).items() if k != "dtype"}
    if theirs != ours:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained on another LLM ({meta.get('llm_name') or theirs}); "
            f"this config loads {mine.get('llm_name') or ours}"
        )
    if (meta.get("llm") or {}).get("dtype") != (mine.get("llm") or {}).get("dtype"):
        log.warning("resuming %s: llm.dtype was %s, now %s", path, meta["llm"].get("dtype"), mine["llm"].get("dtype"))
    if meta.get("vision") != mine.get("vision"):
        log.warning(
            "resuming %s with another vision encoder (%s, now %s): the heads were trained on other features",
            path,
            meta.get("vision"),
            mine.get("vision"),
        )


def warn_config_changes(
    ckpt: dict[str, Any], path: Path, cfg: DictConfig, world_size: int, batch_per_process: int
) -> None:
    """Warn about each RESUME_WARNINGS key and the process count that changed since the checkpoint.

    Args:
        batch_per_process: samples per optimizer step on each process (batch size x grad_accum).
    """
    old = ckpt.get("config")
    if not old:
        return
    old = OmegaConf.create(old)
    for key, consequence in RESUME_WARNINGS.items():
        then, now = _plain(OmegaConf.select(old, key)), _plain(OmegaConf.select(cfg, key))
        if then != now:
            log.warning("resuming %s: %s was %s, now %s; %s", path, key, then, now, consequence)
    then = (ckpt.get("state") or {}).get("world_size", 1)
    if then != world_size:
        log.warning(
            "resuming %s: it was written by %d processes, this run has %d; the effective batch size is now %d "
            "(set training.grad_accum to keep it)",
            path,
            then,
            world_size,
            batch_per_process * world_size,
        )


# Config keys a resumed run may change, and what changing them does.
RESUME_WARNINGS = {
    "training.epochs": "the run ends at the new count (a cosine LR schedule is stretched or shrunk to it)",
    "training.seed": "the rest of the run shuffles by the new seed (inside an interrupted epoch, a sample may then "
    "be seen twice or not at all)",
    "data.batch_size": "the position inside the epoch is kept in samples; batches are now of the new size",
    "training.grad_accum": "optimizer steps now take the new number of micro-batches",
    "optim.lr": "the restored optimizer and LR schedule keep the checkpoint's value",
    "optim.weight_decay": "the restored optimizer keeps the checkpoint's value",
    "optim.schedule": "the LR schedule of this config continues from the checkpoint's step",
    "training.grad_clip": "the new value applies from here on",
    "training.amp": "the new value applies from here on",
    "model.loss_weights": "the new weights apply from here on",
    "model.class_weights": "the new weights apply from here on",
    "checkpoint.min_metrics": "later epochs are judged by the new floors against the best epoch so far as it was "
    "ranked then",
}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _load_or_error(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    # Rank 0 loads; an error travels to the other ranks instead of leaving them waiting.
    try:
        return load_checkpoint(path, map_location="cpu"), None
    except CheckpointError as exc:
        return None, str(exc)
