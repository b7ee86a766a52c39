"""One exclusive lock on a file: across processes (``flock``) and reentrant within a thread.

A run's ``jobs.json`` changes under ``RUN/.jobs.json.lock`` (:func:`launcher.runs.run_lock`); a sweep's
workers claim trials under ``SWEEP/.claim.lock`` (:func:`launcher.sweep.study.ask_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path

_held = threading.local()  # the locks this thread holds: path -> depth


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold ``lock_file``'s lock (its folder is made when missing); a thread that holds it already goes on."""
    lock_file = Path(lock_file)
    key = str(lock_file.absolute())
    held = _held.__dict__.setdefault("depth", {})
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
            fcntl.flock(fh, fcntl.LOCK_UN)
