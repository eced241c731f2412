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


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn SIM's own errors into a one-paragraph message and exit status 1 instead of a traceback.

    In a multirun the error propagates instead, so the sweeper records the failed job and goes on.
    """
    try:
        yield
    except SimError as exc:
        if _multirun():
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
