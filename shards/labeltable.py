"""The per-split label table of a manifest: each target's value for every sample, written at pack time.

Training reads its targets from this table (one vectorised lookup per batch) instead of decoding a JSON
member per sample. A column holds a number or ``None`` (the sample has no value) per sample, in the
split's member order; a target with any other kind of value (a string, a boolean, a non-finite number)
gets no column, so that readers go on reading it from the JSON members, as they do for shard sets packed
before the table existed.
"""

from __future__ import annotations

import math

import numpy as np

from shards.manifest import Split

_NOT_A_NUMBER = object()


def table_value(value) -> float | None | object:
    """A label as its table holds it: a finite number as float, ``None`` as ``None``, else a marker that the
    column cannot be kept."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return _NOT_A_NUMBER


def same_value(recorded: float | None, labels: dict, name: str) -> bool:
    """Whether a table entry is what the sample's JSON says of target ``name``."""
    value = table_value(labels.get(name))
    return value is not _NOT_A_NUMBER and value == recorded


class LabelTableWriter:
    """Collects the table of one split while its samples are written."""

    def __init__(self, targets: list[str]):
        self.columns: dict[str, list[float | None]] = {name: [] for name in targets}

    def add(self, labels: dict) -> None:
        for name in list(self.columns):
            value = table_value(labels.get(name))
            if value is _NOT_A_NUMBER:
                del self.columns[name]  # read from the JSON members instead
            else:
                self.columns[name].append(value)

    def table(self) -> dict[str, list[float | None]]:
        return self.columns


def label_column(split: Split, name: str) -> np.ndarray | None:
    """Target ``name``'s column of ``split`` as float64 (NaN where a sample has no value), or ``None`` when the
    shard set has no such column (an older set, or labels that are not all numbers)."""
    column = (split.labels or {}).get(name)
    if column is None or len(column) != split.count:
        return None
    return np.array([math.nan if v is None else v for v in column], dtype=np.float64)
