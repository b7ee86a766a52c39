"""Summaries of a shard set: counts per split and class, target statistics, image statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.manifest import Manifest, load_manifest
from shards.reader import ShardReader


@dataclass
class Summary:
    count: int
    mean: float
    std: float
    min: float
    max: float
    p01: float | None = None
    p50: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: np.ndarray, percentiles: bool = False) -> Summary | None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return None
        out = cls(count=int(v.size), mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()))
        if percentiles:
            out.p01, out.p50, out.p99 = (float(x) for x in np.percentile(v, [1, 50, 99]))
        return out


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


def inspect_shard_set(directory: str | os.PathLike, sample_images: int = 64, seed: int = 0) -> Inspection:
    """Read the manifest and every sample's labels (JSON members only), and ``sample_images`` images per split."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    info = Inspection(directory=directory, manifest=manifest)
    regression = [n for n, t in manifest.targets.items() if t.kind == "regression"]
    classification = {n: t for n, t in manifest.targets.items() if t.kind == "classification"}
    for name in classification:
        info.class_counts[name] = {}
    for name in manifest.targets:
        info.missing[name] = {}
    for name in regression:
        info.target_stats[name] = {}
    for split_name, split in manifest.splits.items():
        info.counts[split_name] = split.count
        info.shards[split_name] = len(split.shards)
        info.bytes[split_name] = sum(s.bytes for s in split.shards)
        reader = ShardReader(directory, split_name, manifest)
        try:
            values: dict[str, list] = {name: [] for name in manifest.targets}
            for i in range(len(reader)):
                labels = reader.labels(i)
                for name in manifest.targets:
                    values[name].append(labels.get(name))
            for name, target in manifest.targets.items():
                present = [v for v in values[name] if v is not None]
                info.missing[name][split_name] = len(values[name]) - len(present)
                if target.kind == "classification":
                    classes = target.classes or []
                    counts = dict.fromkeys(classes, 0)
                    for v in present:
                        key = classes[v] if isinstance(v, int) and 0 <= v < len(classes) else str(v)
                        counts[key] = counts.get(key, 0) + 1
                    info.class_counts[name][split_name] = counts
                else:
                    info.target_stats[name][split_name] = Summary.of(np.asarray(present, dtype=np.float64))
            n = min(sample_images, len(reader))
            picks = np.sort(np.random.default_rng(seed).choice(len(reader), size=n, replace=False)) if n else []
            pixels = [reader.read(int(i))[0].astype(np.float64).ravel() for i in picks]
            info.sampled[split_name] = n
            info.image_stats[split_name] = Summary.of(np.concatenate(pixels), percentiles=True) if pixels else None
        finally:
            reader.close()
    return info


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _class_cells(counts: dict[str, int], classes: list[str]) -> list[str]:
    n = sum(counts.get(c, 0) for c in classes)
    return [f"{counts.get(c, 0)} ({100 * counts.get(c, 0) / n:.0f}%)" if n else "0" for c in classes]


def print_inspection(info: Inspection, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 120)
    m = info.manifest
    src = m.source
    console.print(f"[bold]{info.directory}[/bold]  format {m.format} v{m.version}")
    details = ", ".join(f"{k}={v}" for k, v in src.items() if k not in ("classes",) and not isinstance(v, dict | list))
    console.print(f"source: {details}")
    console.print(f"image: shape {tuple(m.image.shape)} (C,H,W), {m.image.dtype}; primary target: {m.primary_target}")

    splits = list(m.splits)
    table = Table(title="Samples per split")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("shards", justify="right")
    table.add_column("MB", justify="right")
    primary = m.targets[m.primary_target]
    classes = (primary.classes or []) if primary.kind == "classification" else []
    for c in classes:
        table.add_column(c, justify="right")
    per_split = info.class_counts.get(m.primary_target, {})
    for s in splits:
        table.add_row(s, str(info.counts[s]), str(info.shards[s]), f"{info.bytes[s] / 1e6:.1f}",
                      *_class_cells(per_split.get(s, {}), classes))
    totals = {c: sum(per_split.get(s, {}).get(c, 0) for s in splits) for c in classes}
    table.add_row("total", str(sum(info.counts.values())), str(sum(info.shards.values())),
                  f"{sum(info.bytes.values()) / 1e6:.1f}", *_class_cells(totals, classes), style="bold")
    console.print(table)

    for name, target in m.targets.items():
        if target.kind != "classification" or name == m.primary_target:
            continue
        names = target.classes or []
        table = Table(title=f"Target {name} (classification) per split")
        table.add_column("split")
        table.add_column("missing", justify="right")
        for c in names:
            table.add_column(c, justify="right")
        for s in splits:
            table.add_row(s, str(info.missing[name].get(s, 0)), *_class_cells(info.class_counts[name].get(s, {}), names))
        console.print(table)

    if info.target_stats:
        table = Table(title="Regression targets (the manifest's statistics are from train only)")
        for col in ("target", "split", "n", "missing", "mean", "std", "min", "max"):
            table.add_column(col, justify="left" if col in ("target", "split") else "right")
        for name in info.target_stats:
            stats = m.targets[name].stats
            table.add_row(name, "manifest", str(stats.count) if stats else "-", "",
                          *(_g(getattr(stats, k, None)) for k in ("mean", "std", "min", "max")), style="bold")
            for s in splits:
                st = info.target_stats[name].get(s)
                table.add_row(name, s, str(st.count if st else 0), str(info.missing[name].get(s, 0)),
                              *(_g(getattr(st, k, None)) for k in ("mean", "std", "min", "max")))
        console.print(table)

    table = Table(title="Image pixels (manifest: all of train; splits: a sample of images)")
    for col in ("split", "images", "mean", "std", "min", "p1", "median", "p99", "max"):
        table.add_column(col, justify="left" if col == "split" else "right")
    st = m.image.stats
    if st is not None:
        table.add_row("manifest", str(info.counts.get("train", 0)), _g(st.mean), _g(st.std), _g(st.min), "", "", "",
                      _g(st.max), style="bold")
    for s in splits:
        st = info.image_stats.get(s)
        if st is not None:
            table.add_row(s, str(info.sampled[s]), _g(st.mean), _g(st.std), _g(st.min), _g(st.p01), _g(st.p50),
                          _g(st.p99), _g(st.max))
    console.print(table)
