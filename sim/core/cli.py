"""Shared behaviour of the command-line entry points.

Every command is a Hydra main with its own `conf/<command>.yaml`, so `--help`, `--cfg job`, overrides and
run directories work alike everywhere. `compose` is for code that needs one of those configs outside a
Hydra main (tests, a command that composes variants of its own config).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from sim.core.errors import ConfigError, SimError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def failed_trials_message(
    n_failed: int, n_trials: int, first: str, error: str, run_dir: str | Path | None, *, noun: str = "trial"
) -> str:
    """What a sweep whose trials failed says: how many, the first one's error and where its traceback is.

    Args:
        first: names the first failed trial, e.g. "trial 0 (model.K=4)".
        noun: what the sweep calls its runs ("trial", or "job" for a grid).
        error: its `Type: message` (`describe_error`).
        run_dir: its run directory, whose logs/stdout.log holds the traceback (if the trial got that far).
    """
    if n_failed == n_trials > 1:
        head = f"all {n_trials} {noun}s failed"
    else:
        head = f"{n_failed} of {n_trials} {noun}{'s' if n_trials > 1 else ''} failed"
    log_file = Path(run_dir) / "logs" / "stdout.log" if run_dir else None
    where = f" (its log: {log_file})" if log_file is not None and log_file.is_file() else ""
    return f"{head}{'; the first,' if n_failed > 1 else ':'} {first}, with {error}{where}"


def compose(config_name: str, overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml composed with `overrides`, as the command line would compose it.

    Inside a Hydra main the running Hydra composes it: its search path is this conf/ already, and a
    second initialization would be refused.

    Raises:
        ConfigError: an override names no key or option of the config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad arguments {' '.join(overrides)!r}: {exc}") from None


def command_line() -> list[str]:
    """The overrides the running Hydra main was given, for composing a variant of its config."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def require(cfg: DictConfig, key: str, example: str) -> None:
    """Refuse a config whose mandatory `key` was not given (??? in the config file, or empty).

    Raises:
        ConfigError: naming the key and what to type, e.g. `out must be set: out=DIR`.
    """
    if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) in (None, ""):
        raise ConfigError(f"{key} must be set: {key}={example}")


def comma_lists(argv: list[str], keys: Iterable[str]) -> list[str]:
    """`key=a,b` as `key=[a,b]` for the list-valued `keys`.

    Hydra reads an unbracketed comma list as a sweep, which a single run refuses; the plain form is
    what users of these keys type.
    """
    keys = set(keys)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and "," in value and not value.startswith(("[", "'", '"')):
            arg = f"{key}=[{value}]"
        out.append(arg)
    return out


# Hydra's own flags that take the next argument as their value.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def bare_args_as_list(argv: list[str], key: str) -> list[str]:
    """The bare arguments (no `=`, no flag) of a command line as one `key=[...]` override.

    For commands that take paths as users type them, `python -m sim compare DIR DIR out=X`, before
    Hydra reads the line (it refuses an argument that is not an override).
    """
    bare: list[str] = []
    rest: list[str] = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        is_value = prev in _VALUE_FLAGS or (prev in ("--info", "-i") and arg in _INFO_TOPICS)
        if "=" in arg or arg.startswith("-") or is_value:
            rest.append(arg)
        else:
            bare.append(arg)
    if not bare:
        return rest
    quoted = ",".join("'" + a.replace("\\", "\\\\").replace("'", "\\'") + "'" for a in bare)
    return [f"{key}=[{quoted}]", *rest]
