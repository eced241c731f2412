"""`train(cfg)`: one training run from a composed config (what train.py's Hydra main calls)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sim import distributed
from sim.config import validate_config
from sim.errors import ConfigError
from sim.run import RunDir, attach_log_file, detach_log_file, write_config, write_exports

log = logging.getLogger(__name__)


def hydra_run_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return None


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, writing the contract's run tree into `run_dir` (default: Hydra's run directory).

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
    handler = attach_log_file(run.logs / "stdout.log") if env.is_main else None
    try:
        if env.is_main:
            info = write_config(run, cfg)
            log.info("run directory %s (git %s)", run.root, info["git"]["commit"])
            log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
            write_exports(run)
        from sim.pruning import sweep_callbacks
        from sim.trainer import Trainer

        trainer = Trainer(cfg, run, callbacks=sweep_callbacks(cfg))
        trainer.setup()
        result = trainer.fit()
        log.info("best epoch %d: %s", result["best_epoch"], result["best"])
        if env.is_main:
            _plot_curves(run.root)
        return result
    except Exception:
        log.exception("training failed")
        raise
    finally:
        if handler is not None:
            detach_log_file(handler)


def _check_ranks_agree(cfg: DictConfig) -> None:
    """Every rank must train the same config.

    Raises:
        ConfigError: the ranks composed different configs (e.g. a sweeper that samples per process).
    """
    mine = OmegaConf.to_yaml(cfg, resolve=True)
    if not distributed.all_ranks_agree(mine == distributed.broadcast_object(mine)):
        raise ConfigError("the torchrun processes composed different configs (a sweeper that samples per process, such "
                          "as optuna, or a value that differs per process); run sweeps with hydra/launcher=slurm, or "
                          "one torchrun per trial")


def _plot_curves(root: Path) -> None:
    # The checkpoints and metrics are already on disk: a figure that fails to draw must not fail the run.
    try:
        from sim.plots import plot_training_curves

        path = plot_training_curves(root)
        if path is not None:
            log.info("training curves: %s", path)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not draw the training curves (%s: %s); the run itself is complete", type(exc).__name__, exc)


def objective(result: dict[str, Any], names: str | list[str]) -> float | tuple[float, ...]:
    """The value(s) a sweeper optimizes: best-epoch val metrics by name (NaN where undefined).

    Raises:
        optuna.TrialPruned: the sweep's pruner stopped the run (the sweeper records it as pruned).
    """
    from sim.pruning import raise_if_pruned

    raise_if_pruned(result)
    best = result.get("best") or {}
    single = isinstance(names, str)
    values = []
    for name in [names] if single else list(names):
        v = best.get(name)
        values.append(math.nan if v is None else float(v))
    return values[0] if single else tuple(values)
