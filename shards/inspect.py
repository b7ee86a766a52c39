"""Summaries of a shard set: counts per split and class, target statistics, image statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.manifest import Manifest, Stats, Target, load_manifest
from shards.reader import ShardReader


class Summary(Stats):
    """The manifest's statistics of some values, with percentiles where asked (pixels)."""

    p01: float | None = None
    p50: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: np.ndarray, percentiles: bool = False) -> Summary | None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return None
        points = dict(zip(("p01", "p50", "p99"), (float(x) for x in np.percentile(v, [1, 50, 99])), strict=True))
        return cls(count=int(v.size), mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
                   max=float(v.max()), **(points if percentiles else {}))


@dataclass
class Inspection:
    directory: Path
    manifest: Manifest
    counts: dict[str, int] = field(default_factory=dict)  # split -> samples
    shards: dict[str, int] = field(default_factory=dict)  # split -> shards
    bytes: dict[str, int] = field(default_factory=dict)  # split -> bytes
    class_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # target -> split -> class
    target_stats: dict[str, dict[str, Summary | None]] = field(default_factory=dict)  # regression: target -> split
    missing: dict[str, dict[str, int]] = field(default_factory=dict)  # target -> split -> samples without a value
    image_stats: dict[str, Summary | None] = field(default_factory=dict)  # split -> pixels of sampled images
    sampled: dict[str, int] = field(default_factory=dict)  # split -> images sampled


def _class_counts(values: list, target: Target) -> dict[str, int]:
    classes = target.classes or []
    counts = dict.fromkeys(classes, 0)
    for v in values:
        key = classes[v] if isinstance(v, int) and 0 <= v < len(classes) else str(v)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _add_labels(info: Inspection, split: str, reader: ShardReader) -> None:
    """Count classes, missing values and regression statistics of every sample of ``split``."""
    targets = info.manifest.targets
    values: dict[str, list] = {name: [] for name in targets}
    for i in range(len(reader)):
        labels = reader.labels(i)
        for name in targets:
            values[name].append(labels.get(name))
    for name, target in targets.items():
        present = [v for v in values[name] if v is not None]
        info.missing.setdefault(name, {})[split] = len(values[name]) - len(present)
        if target.kind == "classification":
            info.class_counts.setdefault(name, {})[split] = _class_counts(present, target)
        else:
            info.target_stats.setdefault(name, {})[split] = Summary.of(np.asarray(present, dtype=np.float64))


def _add_pixels(info: Inspection, split: str, reader: ShardReader, sample_images: int, seed: int) -> None:
    n = min(sample_images, len(reader))
    picks = np.sort(np.random.default_rng(seed).choice(len(reader), size=n, replace=False)) if n else []
    pixels = [reader.read(int(i))[0].astype(np.float64).ravel() for i in picks]
    info.sampled[split] = n
    info.image_stats[split] = Summary.of(np.concatenate(pixels), percentiles=True) if pixels else None


def inspect_shard_set(directory: str | os.PathLike, sample_images: int = 64, seed: int = 0) -> Inspection:
    """Read the manifest and every sample's labels (JSON members only), and ``sample_images`` images per split."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    info = Inspection(directory=directory, manifest=manifest)
    for split_name, split in manifest.splits.items():
        info.counts[split_name] = split.count
        info.shards[split_name] = len(split.shards)
        info.bytes[split_name] = sum(s.bytes for s in split.shards)
        reader = ShardReader(directory, split_name, manifest)
        try:
            _add_labels(info, split_name, reader)
            _add_pixels(info, split_name, reader, sample_images, seed)
        finally:
            reader.close()
    return info


# --------------------------------------------------------------------------- printing

def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _class_cells(counts: dict[str, int], classes: list[str]) -> list[str]:
    n = sum(counts.get(c, 0) for c in classes)
    return [f"{counts.get(c, 0)} ({100 * counts.get(c, 0) / n:.0f}%)" if n else "0" for c in classes]


def _table(title: str, columns: list[str], left: int = 1):
    """A rich table whose first ``left`` columns are left-aligned and the rest right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < left else "right")
    return table


def _header(info: Inspection, console) -> None:
    m = info.manifest
    details = ", ".join(f"{k}={v}" for k, v in m.source.items() if k != "classes" and not isinstance(v, dict | list))
    console.print(f"[bold]{info.directory}[/bold]  format {m.format} v{m.version}")
    console.print(f"source: {details}")
    console.print(f"image: shape {tuple(m.image.shape)} (C,H,W), {m.image.dtype}; primary target: {m.primary_target}")


def _splits_table(info: Inspection):
    m = info.manifest
    primary = m.targets[m.primary_target]
    classes = (primary.classes or []) if primary.kind == "classification" else []
    table = _table("Samples per split", ["split", "samples", "shards", "MB", *classes])
    per_split = info.class_counts.get(m.primary_target, {})
    for s in m.splits:
        table.add_row(s, str(info.counts[s]), str(info.shards[s]), f"{info.bytes[s] / 1e6:.1f}",
                      *_class_cells(per_split.get(s, {}), classes))
    totals = {c: sum(per_split.get(s, {}).get(c, 0) for s in m.splits) for c in classes}
    table.add_row("total", str(sum(info.counts.values())), str(sum(info.shards.values())),
                  f"{sum(info.bytes.values()) / 1e6:.1f}", *_class_cells(totals, classes), style="bold")
    return table


def _secondary_class_tables(info: Inspection):
    m = info.manifest
    for name, target in m.targets.items():
        if target.kind != "classification" or name == m.primary_target:
            continue
        names = target.classes or []
        table = _table(f"Target {name} (classification) per split", ["split", "missing", *names])
        for s in m.splits:
            table.add_row(s, str(info.missing[name].get(s, 0)), *_class_cells(info.class_counts[name].get(s, {}), names))
        yield table


def _regression_table(info: Inspection):
    m = info.manifest
    moments = ("mean", "std", "min", "max")
    table = _table("Regression targets (the manifest's statistics are from train only)",
                   ["target", "split", "n", "missing", *moments], left=2)
    for name in info.target_stats:
        stats = m.targets[name].stats
        table.add_row(name, "manifest", str(stats.count) if stats else "-", "",
                      *(_g(getattr(stats, k, None)) for k in moments), style="bold")
        for s in m.splits:
            st = info.target_stats[name].get(s)
            table.add_row(name, s, str(st.count if st else 0), str(info.missing[name].get(s, 0)),
                          *(_g(getattr(st, k, None)) for k in moments))
    return table


def _pixels_table(info: Inspection):
    table = _table("Image pixels (manifest: all of train; splits: a sample of images)",
                   ["split", "images", "mean", "std", "min", "p1", "median", "p99", "max"])
    st = info.manifest.image.stats
    if st is not None:
        table.add_row("manifest", str(info.counts.get("train", 0)), _g(st.mean), _g(st.std), _g(st.min), "", "", "",
                      _g(st.max), style="bold")
    for s in info.manifest.splits:
        st = info.image_stats.get(s)
        if st is not None:
            table.add_row(s, str(info.sampled[s]), *(_g(getattr(st, k)) for k in
                                                     ("mean", "std", "min", "p01", "p50", "p99", "max")))
    return table


def print_inspection(info: Inspection, console=None) -> None:
    from rich.console import Console

    console = console or Console(width=None if Console().is_terminal else 120)
    _header(info, console)
    console.print(_splits_table(info))
    for table in _secondary_class_tables(info):
        console.print(table)
    if info.target_stats:
        console.print(_regression_table(info))
    console.print(_pixels_table(info))
