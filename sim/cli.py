"""Shared behaviour of the command-line entry points."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

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


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn SIM's own errors into a one-paragraph message and exit status 1 instead of a traceback.

    In a multirun the error propagates instead, so the sweeper records the failed job and goes on.
    """
    try:
        yield
    except Exception as exc:
        error = sim_error_in(exc)
        if error is None or _multirun():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
