"""Samples into batches: the training and evaluation streams over shards (:mod:`.loader`), the batch builders
(:mod:`.batches`), augmentation (:mod:`.augment`), pixel normalisation (:mod:`.normalize`) and fresh
simulations as a training source (:mod:`.stream`, ``data.stream``).

The loader's public names are importable from here too (``from lenstrain.data import TrainStream``), as before
the package was split; they are looked up on first use, so importing a sibling stays light.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    loader = importlib.import_module("lenstrain.data.loader")
    if name.startswith("__") or not hasattr(loader, name):
        raise AttributeError(f"module 'lenstrain.data' has no attribute {name!r}")
    return getattr(loader, name)
