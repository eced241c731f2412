"""Checkpoint files: written atomically, read safely (`weights_only=True`), refused clearly.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only:
`model_state_dict` (trainable modules and telemetry statistics), `optimizer_state_dict`, `epoch`,
`metrics`, `metadata` (see `SimV0Model.metadata`), and optional training `state` for resume.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from sim.core.errors import CheckpointError

REQUIRED_KEYS = ("model_state_dict", "metadata")
CHECKPOINT_FORMAT = "sim.v0"  # metadata.format of every SIM checkpoint


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename into place.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed `atomic_write_bytes` left behind (never a finished file).

    Returns:
        The paths removed.
    """
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialize fully in memory first, so a failing write cannot touch the file in place.

    Raises:
        CheckpointError: the directory is not writable or the disk is full (the old file stays intact).
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir's word for "a parent is a file" is "File exists"
            reason += " (a part of the path is a file, not a directory)"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; the previous file is intact") from exc


def _check_archive_crc(path: Path) -> None:
    """torch.load does not check the CRC of tensor data, so a bit flip there loads silently as
    wrong weights; the zip's own checksums catch it (one read of a file of trainable modules only)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        return  # not a readable zip at all: torch.load below says how
    with archive:
        for info in archive.infolist():
            if info.CRC == 0:  # written without checksums (torch.serialization.set_crc32_options(False))
                continue
            try:
                with archive.open(info) as fh:
                    while fh.read(1 << 22):  # reading to the end checks the CRC
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: {info.filename} does not match its checksum "
                    f"(the file was damaged after it was written; {exc})"
                ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a SIM checkpoint.

    Raises:
        CheckpointError: missing, truncated or corrupt, not a SIM checkpoint, or holding objects that
            would need `weights_only=False` (arbitrary code on load, refused).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_archive_crc(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        # torch's own advice (rerun with weights_only=False) heads every refusal; the line that says
        # what was refused is the useful one.
        detail = next(
            (ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), msg.splitlines()[0] if msg else ""
        )
        # Only a class reference (GLOBAL) means Python objects; anything else (an unknown opcode) is damage.
        if "global" in msg.lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that only load with weights_only=False "
                "(which can run arbitrary code); SIM checkpoints hold plain tensors and containers only. "
                f"Refusing it. Detail: {detail}"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: it does not unpickle ({detail})") from exc
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {first_line})"
        ) from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a SIM checkpoint: expected keys {list(REQUIRED_KEYS)}, found {have}")
    meta = ckpt["metadata"]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(
            f"{path} is not a SIM checkpoint: metadata.format is {found!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    for key in ("dv", "d", "F", "K", "llm"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} metadata lacks {key!r}")
    return ckpt
