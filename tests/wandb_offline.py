"""Reads a W&B offline run file (`<dir>/wandb/offline-run-*/run-*.wandb`) back into its records.

The file is a LevelDB-style log (W&B's "datastore"): a 7-byte header `:W&B` + magic + version, then
32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, type 1 a whole record and
2/3/4 its first/middle/last part. Each record is a `wandb_internal_pb2.Record`, parsed with wandb's
own protobuf classes. The wandb package ships no Python reader any more (its Go core reads these).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, parts, pos = [], b"", CHUNK_HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        parts += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def history(path: str | Path) -> list[dict[str, Any]]:
    """The rows `run.log` wrote, as {key: value} with `_step`."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def config(path: str | Path) -> dict[str, Any]:
    """The run's config (`wandb.init(config=...)`) as plain values."""
    out: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
