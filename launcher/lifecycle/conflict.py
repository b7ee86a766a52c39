"""Whether a directory may take a run (or a sweep): free, holding the same one again, or holding another."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lenstrain.config.schema import ConfigError


class RunConflict(ConfigError):
    """A run (or sweep) directory that holds a different run, or something that is not a run."""


def holds_same(root: Path, record: str, difference: Callable[[], str | None], kind: str) -> bool:
    """True when ``root`` holds this ``kind`` already (its ``record`` file is there and ``difference()`` finds
    none), False when it is free (missing, or only hidden files); :class:`RunConflict` with ``difference()``'s
    words when it holds another one, or when it holds files but no ``record``."""
    root = Path(root)
    if (root / record).is_file():
        why = difference()
        if why:
            raise RunConflict(why)
        return True
    if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
        raise RunConflict(f"{root} exists and is not a {kind} directory; choose another --name or --run-dir")
    return False
