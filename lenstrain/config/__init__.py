"""A run's configuration: the typed schema and its loading (:mod:`.schema`), ``base:`` inheritance
(:mod:`.inherit`) and the generated reference (:mod:`.docs`).

The schema's public names are importable from here too (``from lenstrain.config import load_config``), as
before the package was split; they are looked up on first use, so importing a sibling stays light.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    schema = importlib.import_module("lenstrain.config.schema")
    if name.startswith("__") or not hasattr(schema, name):
        raise AttributeError(f"module 'lenstrain.config' has no attribute {name!r}")
    return getattr(schema, name)
