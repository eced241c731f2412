"""Watching a run live in the tools people already use: TensorBoard, MLflow, Weights & Biases, CSV.

Each option of `conf/logger/` instantiates one small adapter through `_target_`; `logger=[a,b]` selects
several. `build_loggers(cfg)` wraps them in one `Loggers` callback, which turns the trainer's hooks into
what every adapter receives, so the adapters stay thin:

- every `logger.every_n_steps` optimizer steps, at the global step: `train_step/loss`, the loss of
  each head, `train_step/lr`, `train_step/grad_norm` (before clipping) and `train_step/samples_per_s`
  (over the steps since the last point). The step's tensors are read from the device on these steps only.
- every epoch, at the epoch's last global step: `train/<metric>` and `val/<metric>` (the very numbers
  of `metrics/*.jsonl`, in TensorBoard rounded to float32; a null metric is left out), `epoch`, and
  `best/<monitor>` (the monitor at the best epoch so far).
- once: the resolved config as hyperparameters, with `best/<monitor>` and `val/<monitor>` as their
  metrics (TensorBoard's HParams tab and MLflow's compare view line up the runs of a sweep by them);
  at the end, the last epoch's val confusion matrices and the training curves as images.

Only rank 0 logs. An adapter that raises (a full disk, a server gone) is reported once and switched
off; training goes on, and the JSONL files stay the record.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from omegaconf import DictConfig, OmegaConf

from sim.core import labels as L
from sim.core.errors import ConfigError
from sim.training.callbacks import Callback, StepInfo

if TYPE_CHECKING:
    from sim.training.trainer import Trainer

log = logging.getLogger(__name__)

Scalar = bool | int | float | str


@dataclass
class RunInfo:
    """What an adapter needs to know about the run it logs."""

    root: Path  # the run directory
    name: str  # a readable name: the run directory's last two parts (date/time, sweep/trial)
    experiment: str  # MLflow experiment, W&B project
    group: str | None  # the sweep a multirun job belongs to
    resumed: bool  # continuing from a checkpoint: earlier points up to `global_step` stay
    global_step: int  # the optimizer step this attempt starts after
    monitor: str
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config


class LoggerAdapter:
    """One logging backend. `Loggers` calls these in order: open, log_hparams, then log_scalars any
    number of times, log_images, close. Any of them may raise: the adapter is then switched off."""

    name = "logger"

    def open(self, run: RunInfo) -> None:
        pass

    def log_hparams(self, hparams: dict[str, Scalar], metrics: list[str]) -> None:
        pass

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class TensorBoardLogger(LoggerAdapter):
    """Event files through `torch.utils.tensorboard` (`tensorboard --logdir outputs`).

    TensorBoard keeps scalars as float32 (its data server drops float64 ones): a point is the JSONL
    value rounded to float32. The other loggers keep the float64 value itself.

    Args:
        log_dir: where the event files go (default `<run_dir>/tensorboard`).
        flush_secs: how often pending events reach the disk (how stale the live view may be).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        self.log_dir, self.flush_secs = log_dir, int(flush_secs)
        self.writer: Any = None

    def open(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = Path(self.log_dir) if self.log_dir else run.root / "tensorboard"
        # A resumed run re-logs the steps after its checkpoint: TensorBoard drops the earlier
        # attempt's points from purge_step on. A fresh run replaces whatever an earlier one left.
        purge = run.global_step + 1 if run.resumed else 0
        self.writer = SummaryWriter(log_dir=str(path), flush_secs=self.flush_secs, purge_step=purge)

    def log_hparams(self, hparams: dict[str, Scalar], metrics: list[str]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # Written into this run's own event file (SummaryWriter.add_hparams would open a sub-run), so
        # the HParams tab lists one session per run directory with its scalars as the metrics.
        experiment, start, end = hparams_summary(hparams, dict.fromkeys(metrics, 0.0))
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        for tag, path in images.items():
            with Image.open(path) as img:  # reads the header only: the PNG goes in as it is, not decoded and re-encoded
                width, height = img.size
            image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=path.read_bytes())
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


class MLflowLogger(LoggerAdapter):
    """An MLflow run per SIM run (`pip install -e ".[mlflow]"`), through `mlflow.tracking.MlflowClient`.

    Args:
        tracking_uri: a SQLite file (the default, `sqlite:///outputs/mlflow.db`, relative to the working
            directory: works offline), `file:DIR`, or a tracking server `http(s)://host:port`.
        artifact_location: where a new experiment keeps images (default: `mlartifacts/` beside a
            SQLite file; the server's choice otherwise).
        request_timeout, request_retries: per HTTP request to a server, so a dead server costs a few
            seconds once instead of minutes of retries (they set MLflow's MLFLOW_HTTP_REQUEST_*).
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str = "sqlite:///outputs/mlflow.db",
        artifact_location: str | None = None,
        request_timeout: float = 10,
        request_retries: int = 2,
    ) -> None:
        self.tracking_uri, self.artifact_location = str(tracking_uri), artifact_location
        self.request_timeout, self.request_retries = request_timeout, int(request_retries)
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, run: RunInfo) -> None:
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(math.ceil(float(self.request_timeout)))
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.request_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        artifacts = self.artifact_location
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its directory
            if artifacts is None:
                artifacts = (db.parent / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment(run.experiment, artifacts)
        tag = str(run.root.resolve())
        if run.resumed:  # the same MLflow run continues
            found = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`sim.run_dir` = '{tag}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
        tags = {"sim.run_dir": tag, **({"sim.sweep": run.group} if run.group else {})}
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id

    def _experiment(self, name: str, artifacts: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # created meanwhile by another trial of the sweep
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_hparams(self, hparams: dict[str, Scalar], metrics: list[str]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param: a resumed run keeps the values it started with.
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k[:250], str(v)[:6000]) for k, v in hparams.items() if k[:250] not in logged]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_images(self, images: dict[str, Path], step: int) -> None:
        for tag, path in images.items():
            folder = Path(tag).parent
            self.client.log_artifact(
                self.run_id, str(path), artifact_path="images" if folder == Path(".") else f"images/{folder}"
            )

    def close(self, ok: bool) -> None:
        if self.client is not None and self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


class WandbLogger(LoggerAdapter):
    """A Weights & Biases run (`pip install -e ".[wandb]"`), offline by default: the files land in
    `<run_dir>/wandb/` and `wandb sync <run_dir>/wandb/offline-run-*` uploads them later.

    Args:
        mode: offline | online | disabled.
        project: the W&B project (default: `logger.experiment`).
        entity: the W&B team or user (online only).
        tags: run tags.
        dir: where W&B writes (default: the run directory).
    """

    name = "wandb"

    def __init__(
        self,
        mode: str = "offline",
        project: str | None = None,
        entity: str | None = None,
        tags: Sequence[str] = (),
        dir: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r}: expected offline, online or disabled")
        self.mode, self.project, self.entity, self.tags, self.dir = mode, project, entity, list(tags), dir
        self.run: Any = None

    def open(self, run: RunInfo) -> None:
        _require("wandb", "wandb")
        import wandb

        directory = Path(self.dir) if self.dir else run.root
        previous = _wandb_run_id(directory / "wandb") if run.resumed else None
        self.run = wandb.init(
            project=self.project or run.experiment,
            entity=self.entity,
            name=run.name,
            group=run.group,
            tags=self.tags or None,
            dir=str(directory),
            mode=cast(Literal["offline", "online", "disabled"], self.mode),  # checked in __init__
            config=run.config,
            id=previous,
            resume="allow" if previous else None,
            reinit="create_new",
            # The run's own log already has the console; W&B's capture would wrap stdout and stderr.
            settings=wandb.Settings(console="off", silent=True),
        )
        # Epoch metrics plot against the epoch; the per-step ones against W&B's own step.
        self.run.define_metric("epoch")
        for prefix in ("train/*", "val/*", "best/*"):
            self.run.define_metric(prefix, step_metric="epoch")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(path)) for tag, path in images.items()}, step=step)

    def close(self, ok: bool) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if ok else 1)
            if self.mode == "offline":  # run.dir is the run's files/ folder
                log.info("W&B offline run: upload it with `wandb sync %s`", Path(run.dir).parent)


class CSVLogger(LoggerAdapter):
    """Every scalar as a row `step,name,value,time` of a CSV file (default `<run_dir>/metrics/scalars.csv`),
    long format so that new names never change the columns."""

    name = "csv"
    FIELDS = ("step", "name", "value", "time")

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.file: Any = None
        self.writer: Any = None

    def open(self, run: RunInfo) -> None:
        path = Path(self.path) if self.path else run.root / "metrics" / "scalars.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if run.resumed and path.is_file():  # like the JSONL files: keep what the checkpoint has done
            with open(path, newline="", encoding="utf-8") as fh:
                kept = [
                    r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= run.global_step
                ]
        self.file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (open for the run; close() closes it)
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        now = f"{time.time():.3f}"
        self.writer.writerows(
            {"step": step, "name": k, "value": repr(float(v)), "time": now} for k, v in values.items()
        )
        self.file.flush()

    def close(self, ok: bool) -> None:
        if self.file is not None:
            fh, self.file = self.file, None
            fh.close()


class Loggers(Callback):
    """Feeds the adapters from the trainer's hooks (see the module docstring for what and when).

    Args:
        adapters: the configured backends.
        every_n_steps: optimizer steps between two per-step points.
        experiment: the MLflow experiment / W&B project every run of a sweep shares.
        run_name: default: the run directory's last two parts.
        group: the sweep directory of a multirun job.
    """

    def __init__(
        self,
        adapters: Sequence[LoggerAdapter],
        every_n_steps: int = 10,
        experiment: str = "sim",
        run_name: str | None = None,
        group: str | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"logger.every_n_steps={every_n_steps!r} must be an integer >= 1")
        self.adapters = list(adapters)
        self.active: list[LoggerAdapter] = []
        self.every_n_steps, self.experiment, self.run_name, self.group = every_n_steps, str(experiment), run_name, group
        self._samples, self._seconds = 0, 0.0
        self._evaluated = False  # whether this attempt validated an epoch (a resumed run may have nothing left)

    # ---- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main or not self.adapters:
            return
        run = RunInfo(
            root=trainer.run.root,
            name=self.run_name or _short(trainer.run.root),
            experiment=self.experiment,
            group=self.group,
            resumed=trainer.global_step > 0,
            global_step=trainer.global_step,
            monitor=trainer.checkpointer.rule.monitor,
            config=cast(dict[str, Any], OmegaConf.to_container(trainer.cfg, resolve=True)),
        )
        self.active = list(self.adapters)
        self._each("starting", lambda a: a.open(run))
        hparams = flatten(run.config)
        self._each(
            "logging the hyperparameters",
            lambda a: a.log_hparams(hparams, [f"best/{run.monitor}", f"val/{run.monitor}"]),
        )
        self._samples, self._seconds = 0, 0.0

    def on_step_end(self, trainer: Trainer, step: StepInfo) -> None:
        if not self.active:
            return
        self._samples += step.samples
        self._seconds += step.seconds
        if step.global_step % self.every_n_steps:
            return
        names = [k for k in step.losses if k.startswith("loss")]
        tensors = [step.losses[k].float().reshape(()) for k in names]
        if step.grad_norm is not None:
            tensors.append(step.grad_norm.float().reshape(()))
        read = torch.stack(tensors).tolist()  # the one wait for the device, on logged steps only
        values = {f"train_step/{k}": v for k, v in zip(names, read[: len(names)], strict=True)}
        if step.grad_norm is not None:
            values["train_step/grad_norm"] = read[-1]
        values["train_step/lr"] = float(step.lr)
        if self._seconds > 0:  # every rank takes as many samples per step (the train split is dealt evenly)
            values["train_step/samples_per_s"] = self._samples * trainer.dist.world_size / self._seconds
        self._samples, self._seconds = 0, 0.0
        self._each("logging a step", lambda a: a.log_scalars(_finite(values), step.global_step))

    def on_epoch_end(
        self, trainer: Trainer, epoch: int, train: dict[str, Any], val: dict[str, Any], is_best: bool
    ) -> None:
        self._evaluated = True
        if not self.active:
            return
        values: dict[str, float] = {"epoch": float(epoch)}
        for split, metrics in (("train", train), ("val", val)):
            values.update({f"{split}/{k}": float(v) for k, v in metrics.items() if k != "epoch" and v is not None})
        best = next((m for m in trainer.history["val"] if m.get("epoch") == trainer.best_epoch), None)
        if best is not None and best.get(trainer.checkpointer.rule.monitor) is not None:
            values[f"best/{trainer.checkpointer.rule.monitor}"] = float(best[trainer.checkpointer.rule.monitor])
        self._each("logging an epoch", lambda a: a.log_scalars(_finite(values), trainer.global_step))

    def on_fit_end(self, trainer: Trainer, result: dict[str, Any]) -> None:
        if not self.adapters:
            return
        # Every rank takes part (torchmetrics may gather the matrices); only rank 0 draws and logs.
        confusion = trainer.val_metrics.confusion() if self._evaluated else None
        # Drawing takes about a second: only for backends that show images.
        if any(type(a).log_images is not LoggerAdapter.log_images for a in self.active):
            with tempfile.TemporaryDirectory(prefix="sim-images-") as tmp:
                images = self._images(trainer, confusion, Path(tmp))
                if images:
                    self._each("logging images", lambda a: a.log_images(images, trainer.global_step))
        self._close(ok=True)

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._close(ok=False)

    # ---- helpers ------------------------------------------------------------------------------
    def _images(self, trainer: Trainer, confusion: dict[str, torch.Tensor] | None, tmp: Path) -> dict[str, Path]:
        from sim.evaluation.plots import TRAINING_CURVES, plot_confusion  # here: matplotlib only at the end

        images: dict[str, Path] = {}
        try:
            curves = trainer.run.root / TRAINING_CURVES
            if curves.is_file():
                images["training_curves"] = curves
            if confusion is not None:
                epoch = trainer.history["val"][-1].get("epoch")
                for head in L.HEADS:
                    images[f"confusion_val/{head}"] = plot_confusion(
                        confusion[head], L.LABELS[head], tmp / f"confusion_{head}.png", f"val {head}, epoch {epoch}"
                    )
        except Exception as exc:
            log.warning("could not draw the images for the loggers (%s: %s)", type(exc).__name__, exc)
        return images

    def _each(self, what: str, call: Callable[[LoggerAdapter], None]) -> None:
        for adapter in list(self.active):
            try:
                call(adapter)
            except Exception as exc:
                self.active.remove(adapter)
                log.warning(
                    "logger %s failed while %s (%s: %s); it is off for the rest of this run, which goes on "
                    "(metrics/*.jsonl hold every metric)",
                    adapter.name,
                    what,
                    type(exc).__name__,
                    exc,
                )
                _quietly(adapter, ok=False)

    def _close(self, ok: bool) -> None:
        active, self.active = self.active, []
        for adapter in active:
            try:
                adapter.close(ok)
            except Exception as exc:
                log.warning("logger %s failed while closing (%s: %s)", adapter.name, type(exc).__name__, exc)


def flatten(config: Any, prefix: str = "") -> dict[str, Scalar]:
    """A nested config as `a.b.c` keys with bool, int, float or str values (lists and null as JSON text),
    the types hyperparameter views accept."""
    out: dict[str, Scalar] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(config, (bool, int, float, str)):
        out[key] = config
    else:
        out[key] = json.dumps(config, default=str)
    return out


def build_loggers(cfg: DictConfig) -> list[Loggers]:
    """The `logger` group as one callback (none when no logger is selected).

    Raises:
        ConfigError: a bad shared key (`logger.every_n_steps`), or an option that cannot be built.
    """
    from hydra.utils import instantiate

    section = OmegaConf.select(cfg, "logger")
    if section is None:
        return []
    if not isinstance(section, DictConfig):
        raise ConfigError(
            f"logger={section!r}: expected a logger option or a list of them, e.g. logger=[tensorboard,mlflow]"
        )
    adapters: list[LoggerAdapter] = []
    for name, entry in section.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            try:
                adapter = instantiate(entry)
            except Exception as exc:  # Hydra wraps what the adapter raised; the user needs the adapter's words
                cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
                raise cause or ConfigError(f"logger.{name!s}: cannot build {entry._target_} ({exc})") from None
            adapter.name = str(name)
            adapters.append(adapter)
    if not adapters:
        return []
    return [
        Loggers(
            adapters,
            every_n_steps=section.get("every_n_steps", 10),
            experiment=section.get("experiment") or "sim",
            run_name=section.get("run_name"),
            group=_sweep_group(),
        )
    ]


def _sweep_group() -> str | None:
    """The sweep directory of a multirun job (runs of one sweep are grouped by it), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return _short(Path(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None


def _short(path: Path) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


def _finite(values: dict[str, float]) -> dict[str, float]:
    # NaN and inf have no place in MLflow's or W&B's JSON; the guard has already logged the step.
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _sqlite_path(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) and uri != prefix else None


def _wandb_run_id(wandb_dir: Path) -> str | None:
    """The id of the latest W&B run written under `wandb_dir` (its folder is `*-run-<time>-<id>`)."""
    latest = wandb_dir / "latest-run"
    try:
        name = latest.resolve().name if latest.exists() else None
    except OSError:
        return None
    return name.rsplit("-", 1)[-1] if name and "-run-" in name else None


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f'logger={extra} needs the {module} package: pip install -e ".[{extra}]" (make install has it)'
        )


def _quietly(adapter: LoggerAdapter, ok: bool) -> None:
    with contextlib.suppress(Exception):
        adapter.close(ok)
