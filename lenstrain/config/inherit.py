"""Job and config files that inherit: ``base: other.yaml`` at the top of a file.

A file that names a ``base`` is that base, deep-merged with the file's own keys: mappings merge key by key
(at any depth, ``model.kwargs`` included), and any other value (a number, a string, a list, ``null``)
replaces the base's. A base may name a base of its own. ``base`` paths are resolved against the directory
of the file that names them, so ``jobs/a.yaml`` says ``base: b.yaml`` for ``jobs/b.yaml`` from wherever the
command runs. Other paths in a job (``data.shards``, ``model.init_from``) keep their meaning: relative to the
directory the command runs in.

``name`` is never inherited: a job's name is its own (or its file's stem), so that a child never trains
into its base's run directory.

A chain that comes back to a file it has passed is refused, naming the chain. lenstrain reads job files
through here (``lenstrain train JOB``), and so does the launcher (with its own YAML loader, which keeps
``1:30:00`` a string).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

BASE_KEY = "base"
NOT_INHERITED = ("name",)


def deep_merge(base: dict, override: dict) -> dict:
    """A new mapping: ``base`` with ``override`` merged in (mappings key by key, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve_bases(path: str | Path, load: Callable[[Path], dict], error: Callable[[str], Exception]) -> dict:
    """The mapping in ``path`` with its ``base`` chain merged in; ``load`` reads one file (a mapping, its
    own checks and messages), ``error`` makes the exception raised for a bad ``base``."""
    return _resolve(Path(path), load, error, [])


def _resolve(path: Path, load: Callable[[Path], dict], error, chain: list[Path]) -> dict:
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(_shown(p) for p in [*chain[chain.index(here):], here])
        raise error(f"{_shown(chain[-1])}: base: a cycle of job files: {loop}")
    data = load(path)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise error(f"{path}: base: expected the path of a job file (relative to {_shown(here.parent)}), "
                    f"got {base!r}")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = here.parent / base_path
    if not base_path.is_file():
        raise error(f"{path}: base: {base_path}: no such job file (a base is relative to the file that names it)")
    parent = _resolve(base_path, load, error, [*chain, here])
    for key in NOT_INHERITED:
        parent.pop(key, None)
    return deep_merge(parent, data)


__all__ = ["BASE_KEY", "deep_merge", "resolve_bases"]
