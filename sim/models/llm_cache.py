"""A disk cache of LLM weights converted from a GGUF file, so the slow dequantization runs once.

Where: `$SIM_CACHE_DIR`, else `$XDG_CACHE_HOME/sim`, else `~/.cache/sim`; entries live in `llm/`.
An entry is a directory `llm/<gguf stem>-<key>/` that `from_pretrained` reads: `model.safetensors`,
`config.json` and `manifest.json`. The key hashes the GGUF file's sha256 with the versions of the
libraries that convert it (transformers, gguf, torch) and the entry format, so an entry is never
reused across versions. The manifest records the size and sha256 of every file; an entry that does
not match it is rebuilt with a warning. Entries are written to a temporary directory and renamed
into place, so a killed run never leaves a half entry that is trusted. The sha256 of a GGUF file is
remembered in `checksums.json` by path, size and modification time, so it is computed once.
Deleting the cache directory is always safe: the next run converts again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from sim.core.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout of an entry changes
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
CHECKSUMS_FILE = "checksums.json"
# A temporary entry this old belongs to a killed run (a conversion takes well under a minute).
STALE_TEMPORARY_SECONDS = 3600
_CHUNK = 1 << 20


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """The cache directory: `$SIM_CACHE_DIR`, else `$XDG_CACHE_HOME/sim`, else `~/.cache/sim`."""
    env = os.environ if environ is None else environ
    if env.get("SIM_CACHE_DIR"):
        return Path(env["SIM_CACHE_DIR"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "sim"
    return Path.home() / ".cache" / "sim"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def runtime_versions() -> dict[str, str]:
    """Versions of the libraries that turn a GGUF file into tensors: an entry is valid for these only."""
    return {"transformers": _version("transformers"), "gguf": _version("gguf"), "torch": torch.__version__}


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LLMCache:
    """Converted LLM weights on disk, one verified entry per GGUF file and library versions.

    Args:
        root: the cache directory; default `cache_root()` (read from the environment).
        versions: the library versions the key includes; default `runtime_versions()`.
    """

    def __init__(self, root: str | Path | None = None, versions: Mapping[str, str] | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()
        self.versions = dict(versions) if versions is not None else runtime_versions()

    @property
    def entries(self) -> Path:
        return self.root / "llm"

    def source_sha256(self, source: Path) -> str:
        """The sha256 of `source`, remembered by resolved path, size and modification time."""
        stat = source.stat()
        name, memo_path = str(source.resolve()), self.root / CHECKSUMS_FILE
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        memo = memo if isinstance(memo, dict) else {}
        seen = memo.get(name)
        if isinstance(seen, dict) and (seen.get("size"), seen.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return str(seen["sha256"])
        digest = sha256_of(source)
        memo[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        try:
            atomic_write_bytes(memo_path, json.dumps(memo, indent=1, sort_keys=True).encode())
        except OSError as exc:  # a read-only cache only costs the checksum next time
            log.debug("could not remember the checksum of %s: %s", source, exc)
        return digest

    def identity(self, source: Path) -> dict[str, Any]:
        """What an entry for `source` must have been built from (stored in its manifest)."""
        return {"format": CACHE_FORMAT, "source_sha256": self.source_sha256(source), "versions": self.versions}

    def entry_dir(self, source: Path, identity: Mapping[str, Any] | None = None) -> Path:
        """The entry directory of `source` for this cache's versions."""
        identity = self.identity(source) if identity is None else identity
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return self.entries / f"{source.stem}-{key}"

    def load(self, source: str | Path, convert: Callable[[], PreTrainedModel]) -> PreTrainedModel:
        """The model of `source` from its cache entry; `convert()` builds it (and the entry) when the
        entry is missing or fails verification. A cache that cannot be written is skipped with a warning.
        """
        source = Path(source)
        identity = self.identity(source)
        entry = self.entry_dir(source, identity)
        problem = verify_entry(entry, identity)
        if problem is None:
            log.info("loading LLM weights cached in %s", entry)
            return _open_entry(entry)
        if entry.exists():
            log.warning("LLM cache entry %s is unusable (%s); rebuilding it from %s", entry, problem, source)
        else:
            log.info("converting %s once into the LLM cache %s", source, entry)
        model = convert()
        try:
            self._write(entry, model, identity)
        except (OSError, RuntimeError) as exc:  # RuntimeError: safetensors refusing a tensor layout
            log.warning("could not write the LLM cache entry %s (%s); using the converted weights uncached", entry, exc)
            return model
        del model
        return _open_entry(entry)

    def _write(self, entry: Path, model: PreTrainedModel, identity: Mapping[str, Any]) -> None:
        """Write the entry in a temporary directory, then rename it into place."""
        self.entries.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=self.entries))
        try:
            _write_files(tmp, model, identity)
            _install(tmp, entry, identity)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TEMPORARY_SECONDS
        for tmp in self.entries.glob(".*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
            except FileNotFoundError:
                pass


def _write_files(directory: Path, model: PreTrainedModel, identity: Mapping[str, Any]) -> None:
    """The weights, the config (as a plain, unquantized model's) and the manifest, each fsynced."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE)
    config = model.config.to_dict()
    # The tensors are dequantized already: the entry loads as a plain model.
    config.pop("quantization_config", None)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in (WEIGHTS_FILE, CONFIG_FILE)
    }
    (directory / MANIFEST_FILE).write_text(json.dumps({**identity, "files": files}, indent=2, sort_keys=True))
    for name in (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE):
        _fsync(directory / name)


def _install(tmp: Path, entry: Path, identity: Mapping[str, Any]) -> None:
    """Rename the finished `tmp` to `entry`, replacing an unusable entry; keep a concurrent run's good one."""
    if entry.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        os.replace(entry, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        if verify_entry(entry, identity) is not None:
            raise
        return  # another run installed the same entry first
    _fsync(entry.parent)


def verify_entry(entry: Path, identity: Mapping[str, Any]) -> str | None:
    """Why `entry` cannot be trusted for `identity`, or None when every file matches its manifest."""
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in identity.items()):
        return "its manifest describes another source or library versions"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS_FILE, CONFIG_FILE}:
        return "its manifest lists other files"
    for name, expected in files.items():
        if not isinstance(expected, dict):
            return f"its manifest has no checksum of {name}"
        path = entry / name
        try:
            size = path.stat().st_size
            if size != expected.get("size"):
                return f"{name} has {size} bytes, not {expected.get('size')} (truncated?)"
            if sha256_of(path) != expected.get("sha256"):
                return f"{name} does not match its checksum"
        except OSError as exc:
            return f"{name} cannot be read: {exc}"
    return None


def _open_entry(entry: Path) -> PreTrainedModel:
    from transformers import AutoModel

    # float32: the entry holds the dequantized weights as they are; the caller casts.
    return AutoModel.from_pretrained(str(entry), dtype=torch.float32)
