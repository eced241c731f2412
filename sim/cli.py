"""Shared behaviour of the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from sim.errors import SimError

log = logging.getLogger(__name__)


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def sim_error_in(exc: BaseException) -> SimError | None:
    """SIM's own error behind `exc`, if any.

    Hydra's `instantiate` wraps whatever a `_target_` raises in an InstantiationException; the
    message users need is the SimError it was raised from.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, SimError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def describe_error(exc: BaseException) -> str:
    """`Type: message` of SIM's error behind `exc`, else of `exc` itself."""
    error = sim_error_in(exc) or exc
    return f"{type(error).__name__}: {error}"


def exit_with_error(error: BaseException | str) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn SIM's own errors into a one-paragraph message and exit status 1 instead of a traceback.

    In a multirun the error propagates instead, so the sweeper records the failed job and goes on
    (and ends the sweep with its own `error:` line, `sweep_fails_cleanly`).
    """
    try:
        yield
    except Exception as exc:
        error = sim_error_in(exc)
        if error is None or _multirun():
            raise
        exit_with_error(error)


@contextlib.contextmanager
def sweep_fails_cleanly() -> Iterator[None]:
    """For a sweeper's `sweep`: SIM's own errors (trials that failed, a study that cannot go on) end
    the sweep with one `error:` line and exit status 1, as `fail_cleanly` ends a single run."""
    try:
        yield
    except Exception as exc:
        error = sim_error_in(exc)
        if error is None:
            raise
        exit_with_error(error)


def failed_trials_message(n_failed: int, n_trials: int, first: str, error: str, run_dir: str | Path | None) -> str:
    """What a sweep whose trials failed says: how many, the first one's error and where its traceback is.

    Args:
        first: names the first failed trial, e.g. "trial 0 (model.K=4)".
        error: its `Type: message` (`describe_error`).
        run_dir: its run directory, whose logs/stdout.log holds the traceback (if the trial got that far).
    """
    if n_failed == n_trials > 1:
        head = f"all {n_trials} trials failed"
    else:
        head = f"{n_failed} of {n_trials} trial{'s' if n_trials > 1 else ''} failed"
    log_file = Path(run_dir) / "logs" / "stdout.log" if run_dir else None
    where = f" (its log: {log_file})" if log_file is not None and log_file.is_file() else ""
    return f"{head}{'; the first,' if n_failed > 1 else ':'} {first}, with {error}{where}"
