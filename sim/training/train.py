"""`train(cfg)`: one training run from a composed config (what train.py's Hydra main calls)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from sim.core.config import validate_config
from sim.core.errors import ConfigError
from sim.core.run import RunDir, run_log, write_config, write_exports
from sim.training import distributed
from sim.training.callbacks import Callback
from sim.training.debug import build_debug_callbacks
from sim.training.early_stopping import build_early_stopping
from sim.training.loggers import build_loggers
from sim.training.pruning import raise_if_pruned, sweep_callbacks

if TYPE_CHECKING:
    from sim.models.model import SimV0Model
    from sim.training.checkpointing import Checkpointer
    from sim.training.step import LossFn
    from sim.training.trainer import Trainer

log = logging.getLogger(__name__)


def hydra_run_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return None


def train(
    cfg: DictConfig,
    run_dir: str | Path | None = None,
    *,
    callbacks: Sequence[Callback] | None = None,
    loss_fn: LossFn | None = None,
    checkpointer: Checkpointer | None = None,
    model_builder: Callable[..., SimV0Model] | None = None,
) -> dict[str, Any]:
    """Train, writing the contract's run tree into `run_dir` (default: Hydra's run directory).

    Args:
        callbacks: what watches the run (default: `build_callbacks(cfg)`).
        loss_fn, checkpointer, model_builder: passed to the `Trainer` (None: its defaults).

    Returns:
        {"best": best-epoch val metrics, "last": last-epoch val metrics, "best_epoch", "run_dir"}.

    Raises:
        ConfigError, DataError, LLMLoadError, CheckpointError: bad input, with a message naming it.
    """
    root = Path(run_dir) if run_dir is not None else hydra_run_dir()
    if root is None:
        raise ValueError("train(cfg) outside Hydra needs run_dir")
    validate_config(cfg)
    # Under torchrun: one run directory, rank 0's; only rank 0 writes files and logs below warnings.
    env = distributed.init_from_env()
    if env.enabled:
        _check_ranks_agree(cfg)
        first = Path(distributed.broadcast_object(str(root)))
        if first != root:
            log.warning("this rank resolved the run directory %s; using rank 0's, %s", root, first)
        root = first
    run = RunDir(root, create=env.is_main)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    with run_log(run.logs / "stdout.log" if env.is_main else None, log, "training failed"):
        if env.is_main:
            info = write_config(run, cfg)
            log.info("run directory %s (git %s)", run.root, info["git"]["commit"])
            log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
            write_exports(run)
        from sim.training.trainer import Trainer  # here: torchmetrics and the model stay out of start-up

        callbacks = build_callbacks(cfg) if callbacks is None else list(callbacks)
        trainer = Trainer(cfg, run, callbacks, loss_fn=loss_fn, checkpointer=checkpointer, model_builder=model_builder)
        try:
            trainer.setup()
            result = trainer.fit()
        except BaseException as exc:
            for cb in callbacks:
                _notify_failure(cb, trainer, exc)
            raise
        log.info("best epoch %d: %s", result["best_epoch"], result["best"])
        if env.enabled:
            # Leave together: a rank whose process group is torn down while another still talks to it
            # can die in gloo's teardown after a successful run.
            distributed.barrier()
        return result


def _check_ranks_agree(cfg: DictConfig) -> None:
    """Every rank must train the same config.

    Raises:
        ConfigError: the ranks composed different configs (e.g. a sweeper that samples per process).
    """
    mine = OmegaConf.to_yaml(cfg, resolve=True)
    if not distributed.all_ranks_agree(mine == distributed.broadcast_object(mine)):
        raise ConfigError(
            "the torchrun processes composed different configs (a sweeper that samples per process, such "
            "as optuna, or a value that differs per process); run sweeps with hydra/launcher=slurm, or "
            "one torchrun per trial"
        )


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """What watches a run from outside the loop, in the order the hooks run: early stopping decides
    first, the curves are drawn before the loggers pick them up as images.

    Raises:
        ConfigError: a bad `training.early_stopping`, `debug` or `logger` setting.
    """
    # Pruning decides after early stopping and before the loggers, which then record the last epoch.
    return [
        *build_early_stopping(cfg),
        *sweep_callbacks(cfg),
        TrainingCurves(),
        *build_debug_callbacks(cfg),
        *build_loggers(cfg),
    ]


class TrainingCurves(Callback):
    """`<run_dir>/training_curves.png` once training has ended (rank 0)."""

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if trainer.dist.is_main:
            _plot_curves(trainer.run.root)


def _notify_failure(cb: Callback, trainer: Trainer, exc: BaseException) -> None:
    # The run's own error is what the user must see; a callback failing to clean up is only a warning.
    try:
        cb.on_exception(trainer, exc)
    except Exception as err:
        log.warning("%s could not clean up after the failure (%s: %s)", type(cb).__name__, type(err).__name__, err)


def _plot_curves(root: Path) -> None:
    # The checkpoints and metrics are already on disk: a figure that fails to draw must not fail the run.
    try:
        from sim.evaluation.plots import plot_training_curves  # here: matplotlib only once a run has ended

        path = plot_training_curves(root)
        if path is not None:
            log.info("training curves: %s", path)
    except Exception as exc:
        log.warning("could not draw the training curves (%s: %s); the run itself is complete", type(exc).__name__, exc)


def objective(result: dict[str, Any], names: str | list[str]) -> float | tuple[float, ...]:
    """The value(s) a sweeper optimizes: best-epoch val metrics by name (NaN where undefined).

    Raises:
        optuna.TrialPruned: the sweep's pruner stopped the run (the sweeper records it as pruned).
    """
    raise_if_pruned(result)
    best = result.get("best") or {}
    single = isinstance(names, str)
    values = []
    for name in [names] if single else list(names):
        v = best.get(name)
        values.append(math.nan if v is None else float(v))
    return values[0] if single else tuple(values)
