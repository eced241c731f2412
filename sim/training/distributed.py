"""Several processes, one run: torchrun / Slurm process groups, sharding, and sums over ranks.

`torchrun --nproc_per_node=N train.py ...` starts N copies of the command. They must agree on one run
directory, shard the data between them without duplicates, and add up their metrics; only rank 0
writes files. Everything here is a no-op in a single process (world size 1, no process group), so
the trainer calls it unconditionally.

Where the processes come from:
- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
- a Slurm job with several tasks (`hydra/launcher=slurm` with `tasks_per_node` or `nodes` > 1) sets
  SLURM_PROCID and friends, which submitit translates into the torchrun variables.

The backend is gloo for CPU tensors and NCCL for CUDA tensors (both at once where CUDA exists, so
object collectives and CPU metric sums keep working beside NCCL gradients).
"""

from __future__ import annotations

import atexit
import datetime as dt
import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from omegaconf import OmegaConf
from torch.utils.data import Sampler

from sim.core.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_TIME: dt.datetime | None = None


# ---- the launch time: one run directory for every rank -------------------------------------------
def launch_time() -> dt.datetime:
    """The instant this launch started, fixed at first use (rank 0's under torchrun)."""
    global _LAUNCH_TIME
    if _LAUNCH_TIME is None:
        _LAUNCH_TIME = dt.datetime.now()
    return _LAUNCH_TIME


def _now_resolver(pattern: str) -> str:
    return launch_time().strftime(pattern)


def register_resolvers() -> None:
    """`${sim.now:%H-%M-%S}`: like Hydra's `${now:...}`, but one instant shared by every rank.

    Hydra resolves `${now:...}` in each process separately, so N ranks started a second apart would
    scatter one run over several directories; conf/train.yaml's run and sweep dirs use this instead.
    """
    if not OmegaConf.has_resolver("sim.now"):
        OmegaConf.register_new_resolver("sim.now", _now_resolver, use_cache=True)


register_resolvers()


# ---- the process group ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group exists (even of size 1): collectives must then be called on every rank."""
        return tdist.is_available() and tdist.is_initialized()

    @classmethod
    def current(cls) -> DistEnv:
        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def device(self, name: str | None) -> torch.device:
        """The device of this rank: `auto`/`cuda` -> cuda:LOCAL_RANK under a launcher, else as named.

        Raises:
            ConfigError: CUDA asked for but absent, or fewer GPUs on this node than ranks.
        """
        if name in (None, "auto"):
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type != "cuda":
            return device
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device={name}: CUDA is not available on this machine")
        if self.world_size > 1 or "LOCAL_RANK" in os.environ:
            if device.index is not None and device.index != self.local_rank:
                log.warning(
                    "training.device=%s ignored under a distributed launch: rank %d uses cuda:%d (its LOCAL_RANK)",
                    name,
                    self.rank,
                    self.local_rank,
                )
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK={self.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                    "start at most one process per GPU (--nproc_per_node)"
                )
            return torch.device("cuda", self.local_rank)
        return device


def launched() -> bool:
    """True in a process started by torchrun (or given the torchrun variables by a Slurm job)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def _export_slurm_env() -> None:
    # A Slurm job with several tasks runs this command once per task; submitit knows how to turn
    # SLURM_PROCID/SLURM_NTASKS/the node list into what torch.distributed reads.
    under_submitit = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if launched() or not under_submitit or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    log.info("Slurm task %d of %d (master %s:%d)", env.rank, env.world_size, env.master_addr, env.master_port)


def init_from_env() -> DistEnv:
    """Join the process group the launcher describes (idempotent); a plain `python` run stays single.

    Also fixes `${sim.now:...}` to rank 0's launch time, so every rank resolves the same run dir.

    Returns:
        This process's DistEnv (rank 0 of 1 without a launcher).
    """
    _export_slurm_env()
    if not launched() or not tdist.is_available():
        return DistEnv()
    if not tdist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available() and tdist.is_nccl_available()
        if cuda:
            # Object collectives and NCCL need the device bound before the first call.
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        # Long enough for rank 0 to write a large checkpoint while the others wait at the next collective.
        tdist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
        atexit.register(shutdown)
        _share_launch_time()
        env = DistEnv.current()
        log.info(
            "process group: rank %d of %d (local rank %d), backend %s",
            env.rank,
            env.world_size,
            env.local_rank,
            backend,
        )
    return DistEnv.current()


def _share_launch_time() -> None:
    global _LAUNCH_TIME
    # A naive local datetime from rank 0 (not a timestamp): every node then formats the same string.
    _LAUNCH_TIME = dt.datetime.fromisoformat(broadcast_object(dt.datetime.now().isoformat() if is_main() else None))


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def launch_overrides() -> list[str]:
    """Extra Hydra overrides for this rank: ranks other than 0 write nothing of Hydra's (.hydra/)."""
    env = init_from_env()
    return [] if env.is_main else ["hydra.output_subdir=null"]


def backend() -> str | None:
    return str(tdist.get_backend()) if DistEnv.current().enabled else None


def is_main() -> bool:
    return DistEnv.current().is_main


def barrier() -> None:
    if DistEnv.current().enabled:
        tdist.barrier()


# ---- collectives (identity in a single process) --------------------------------------------------
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank `src`'s `obj` on every rank (picklable objects; tensors travel as CPU tensors)."""
    if not DistEnv.current().enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    env = DistEnv.current()
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


def sum_over_ranks(tree: Any) -> Any:
    """The element-wise sum over ranks of a nested dict/list of floats, ints and tensors.

    Every rank must pass a tree of the same structure (dict keys are visited in sorted order).
    Floats are summed in float64, ints in int64, tensors in their own dtype, all on the CPU, so the
    result does not depend on where the values live.
    """
    if not DistEnv.current().enabled:
        return tree
    leaves: list[Any] = []
    _flatten(tree, leaves)
    summed = []
    for leaf in leaves:
        if torch.is_tensor(leaf):
            t = leaf.detach().cpu().clone()
        else:
            t = torch.tensor(leaf, dtype=torch.float64 if isinstance(leaf, float) else torch.int64)
        tdist.all_reduce(t)
        summed.append(t if torch.is_tensor(leaf) else t.item())
    return _unflatten(tree, iter(summed))


def max_over_ranks(value: float) -> float:
    if not DistEnv.current().enabled:
        return value
    t = torch.tensor(float(value), dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def all_ranks_agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank: a decision that changes the step (skip, stop) must be
    taken by all ranks together, or the ones that go on wait forever in DDP's gradient all-reduce."""
    if not DistEnv.current().enabled:
        return bool(flag)
    t = torch.tensor(0 if flag else 1, dtype=torch.int64)
    tdist.all_reduce(t)
    return int(t.item()) == 0


def _flatten(tree: Any, out: list[Any]) -> None:
    if isinstance(tree, Mapping):
        for k in sorted(tree):
            _flatten(tree[k], out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _flatten(v, out)
    elif isinstance(tree, bool) or (not isinstance(tree, (int, float)) and not torch.is_tensor(tree)):
        raise TypeError(f"sum_over_ranks: cannot sum a {type(tree).__name__}")
    else:
        out.append(tree)


def _unflatten(tree: Any, it: Iterator[Any]) -> Any:
    if isinstance(tree, Mapping):
        return {k: _unflatten(tree[k], it) for k in sorted(tree)}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unflatten(v, it) for v in tree)
    return next(it)


# ---- sharding ------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed per (run seed, epoch): nearby seeds do not share shifted orders."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)[0])


class ShardSampler(Sampler[int]):
    """This rank's share of a split, dealt round-robin: rank r takes positions r, r+W, r+2W, ...

    Args:
        n: samples in the split.
        rank, world_size: this process and how many there are.
        shuffle: order the split by a permutation seeded by (seed, epoch) (`set_epoch`), the same on
            every rank, so the order is a pure function of the seed and the epoch: a resumed run
            replays it exactly and can skip what it had already consumed.
        seed: the run's seed.
        even: drop the last `len % world_size` samples of the order so every rank gets as many
            (training: DDP needs the same number of steps on every rank). False deals every sample
            exactly once, some ranks one more than others (evaluation: nothing padded, nothing
            counted twice, unlike DistributedSampler).

    `set_epoch(epoch, start)` starts the epoch at global position `start` of its order: the samples
    before it (consumed by all ranks together, whatever the world size was) are skipped.
    """

    def __init__(
        self, n: int, rank: int = 0, world_size: int = 1, *, shuffle: bool = False, seed: int = 0, even: bool = False
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.shuffle, self.seed, self.even = bool(shuffle), int(seed), bool(even)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.n:
            raise ValueError(f"start {start} outside the epoch's {self.n} samples")
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> torch.Tensor:
        """The whole epoch's order (every rank computes the same)."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def indices(self) -> list[int]:
        rest = self.order()[self.start :]
        if self.even:
            rest = rest[: len(rest) // self.world_size * self.world_size]
        return rest[self.rank :: self.world_size].tolist()

    def per_rank(self, start: int = 0) -> int:
        """Samples this rank gets in an epoch that starts at `start`."""
        rest = self.n - start
        if self.even:
            return rest // self.world_size
        return len(range(self.rank, rest, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.per_rank(self.start)


# ---- DDP -----------------------------------------------------------------------------------------
def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the parameters that train; frozen modules are left out entirely.

    DDP reduces only parameters that require grad, but it would still broadcast every frozen weight at
    start (a whole LLM) and check their shapes; marking them ignored avoids both, and so does it for
    the buffers of modules that hold nothing trainable. Every trainable parameter gets a gradient each
    step (the confidence head reads a detached state but has its own loss), so find_unused_parameters
    is not needed. Buffers (telemetry statistics) are computed identically on every rank and never
    change while training: no per-step broadcast.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    training = {""}  # the modules with a trainable parameter somewhere inside
    for n, p in model.named_parameters():
        if p.requires_grad:
            parts = n.split(".")[:-1]
            training.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in model.named_buffers() if n.rpartition(".")[0] not in training]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    # Newer torch renames broadcast_buffers (and warns about the old name).
    no_buffer_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **no_buffer_sync,
    )
