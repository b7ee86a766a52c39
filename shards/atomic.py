"""Durable writes, for every floor: a file replaced whole (fsync, rename, fsync of its directory), and the
fsyncs themselves. ``shards`` writes its manifests with them, ``lenstrain`` its run files and checkpoints,
the launcher ``jobs.json`` and ``job.yaml``."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``path`` so that a reader sees either the old file or the whole new one (fsync, then replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: dict | list) -> None:
    """:func:`write_atomic` of ``payload`` as indented JSON with a final newline."""
    write_atomic(path, json.dumps(payload, indent=1) + "\n")
