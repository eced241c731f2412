"""The run directory: the contract's output tree inside Hydra's run dir.

<run_dir>/config_resolved.yaml   checkpoints/   metrics/   logs/stdout.log   export/
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sim.core import labels as L
from sim.core.cli import sim_error_in
from sim.core.config import to_dict
from sim.core.errors import DataError

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
PACKAGES = ("torch", "transformers", "hydra-core", "omegaconf", "torchmetrics", "numpy", "hydra-optuna-sweeper", "sim")


class RunDir:
    """Paths of one run's output tree (created on construction unless `create=False`: ranks other
    than 0 of a distributed run only read it)."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics"
        self.logs = self.root / "logs"
        self.export = self.root / "export"
        for d in (self.root, self.checkpoints, self.metrics, self.logs, self.export) if create else ():
            d.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def metrics_file(self, split: str) -> Path:
        return self.metrics / f"{split}_metrics.jsonl"


def attach_log_file(path: str | Path) -> logging.Handler:
    """Send everything logged (and warnings) to `path` too. Returns the handler, to detach later."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


@contextlib.contextmanager
def run_log(path: str | Path | None, logger: logging.Logger, what: str) -> Iterator[None]:
    """Log into the file `path` too while the block runs (None: no file, as on ranks other than 0);
    an exception leaving the block is logged as `what` failing, with its traceback, and re-raised.

    SIM's own errors (SimError, also wrapped by Hydra's instantiate) reach the screen as the one
    `error:` line of `sim.core.cli.fail_cleanly`, so their traceback goes to the file only, for whoever
    needs it. Any other exception is a bug: its traceback is shown as well.
    """
    handler = attach_log_file(path) if path is not None else None
    try:
        yield
    except Exception as exc:
        error = sim_error_in(exc)
        if error is None:
            logger.exception(what)
        elif handler is not None:
            # Handled by the file handler alone: through the logger it would reach the console too.
            handler.handle(
                logger.makeRecord(
                    logger.name,
                    logging.ERROR,
                    __file__,
                    0,
                    "%s: %s",
                    (what, error),
                    (type(exc), exc, exc.__traceback__),
                )
            )
        raise
    finally:
        if handler is not None:
            detach_log_file(handler)


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_info() -> dict[str, Any]:
    """Provenance written next to the resolved config."""
    src = Path(__file__).resolve().parents[2]
    return {
        "git": git_info(src),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_config(run: RunDir, cfg: DictConfig) -> dict[str, Any]:
    """config_resolved.yaml: the fully resolved config plus `_run` (git hash, package versions, command)."""
    resolved = to_dict(cfg)
    info = run_info()
    doc = OmegaConf.create({**resolved, "_run": info})
    (run.root / "config_resolved.yaml").write_text(OmegaConf.to_yaml(doc))
    return info


def write_exports(run: RunDir) -> None:
    """export/labels.json and export/sim_v0_infer.py (the standalone inference wrapper)."""
    (run.export / "labels.json").write_text(json.dumps(L.labels_json(), indent=2) + "\n")
    # The wrapper is a file copied into each run, not code this module imports.
    template = Path(__file__).resolve().parents[1] / "export" / "infer_template.py"
    shutil.copyfile(template, run.export / "sim_v0_infer.py")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
        fh.flush()


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict[str, Any]]:
    """A metrics .jsonl file, one JSON object per epoch (a missing file: empty).

    A line torn by a crash mid-append is dropped with a warning; with `strict`, any line that is not
    a JSON object raises DataError naming the file and line (for reports, which must not guess).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise DataError(
                    f"{path}: line {i} is not JSON ({exc.msg}); expected one JSON object per epoch"
                ) from None
            logging.getLogger(__name__).warning("%s line %d is not JSON (torn by a crash?): dropped", path, i)
            continue
        if strict and not isinstance(rec, dict):
            raise DataError(f"{path}: line {i} is {type(rec).__name__}; expected one JSON object per epoch")
        records.append(rec)
    return records
