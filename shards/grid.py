"""A PNG grid of sample images with their labels, stretched so that faint arcs show."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from shards.manifest import Manifest, load_manifest
from shards.reader import ShardReader

REGRESSION_ROWS = 4


def asinh_stretch(image: np.ndarray, softening: float = 0.02) -> np.ndarray:
    """Map a ``(C,H,W)`` image to ``[0,1]`` (H,W) or (H,W,3): clip to the 1st-99.8th percentile, then asinh.

    The asinh curve is linear for faint values and logarithmic for bright ones, so a lensed arc stays
    visible next to a bright lens galaxy. ``softening`` sets where the curve turns (as a fraction of the range).
    """
    x = np.asarray(image, dtype=np.float64)
    x = x if x.shape[0] == 3 else x[:1]
    lo, hi = np.percentile(x, [1.0, 99.8])
    if not hi > lo:
        y = np.zeros_like(x)
    else:
        y = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        y = np.arcsinh(y / softening) / np.arcsinh(1.0 / softening)
    return np.moveaxis(y, 0, -1) if y.shape[0] == 3 else y[0]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _caption(manifest: Manifest, labels: dict) -> str:
    parts = []
    for name, target in manifest.targets.items():
        value = labels.get(name)
        if value is None:
            continue
        if target.kind == "classification" and target.classes and isinstance(value, int) \
                and 0 <= value < len(target.classes):
            parts.append(target.classes[value])
        else:
            parts.append(f"{name}={_fmt(value)}")
    return "\n".join(parts[:3])


def _choose(reader: ShardReader, manifest: Manifest, per_class: int) -> list[tuple[str, list[int]]]:
    """Rows of the grid: (row title, sample indices)."""
    target = manifest.target
    name = manifest.primary_target
    if target.kind == "classification" and target.classes:
        rows: dict[int, list[int]] = {c: [] for c in range(len(target.classes))}
        filled = 0
        for i in range(len(reader)):
            value = reader.labels(i).get(name)
            if isinstance(value, int) and value in rows and len(rows[value]) < per_class:
                rows[value].append(i)
                filled += 1
                if filled == per_class * len(rows):
                    break
        return [(target.classes[c], idx) for c, idx in rows.items()]
    values = {i: reader.labels(i).get(name) for i in range(len(reader))}
    ordered = sorted((i for i, v in values.items() if v is not None), key=lambda i: (values[i], i))
    want = min(len(ordered), per_class * REGRESSION_ROWS)
    if want == 0:
        return []
    picks = [ordered[round(k * (len(ordered) - 1) / max(want - 1, 1))] for k in range(want)]
    spans = [picks[r * per_class:(r + 1) * per_class] for r in range(math.ceil(want / per_class))]
    return [(f"{name}\n{_fmt(values[idx[0]])} .. {_fmt(values[idx[-1]])}", idx) for idx in spans]


def write_grid(directory: str | os.PathLike, out_png: str | os.PathLike, per_class: int = 8,
               split: str = "train") -> Path:
    """Write a grid of ``per_class`` samples per class (or ``per_class`` x 4 spanning a regression target)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    manifest = load_manifest(directory)
    reader = ShardReader(directory, split, manifest)
    try:
        rows = _choose(reader, manifest, per_class)
        n_rows = max(len(rows), 1)
        cols = max([len(idx) for _, idx in rows] + [1])
        fig = Figure(figsize=(1.7 * cols + 0.6, 1.9 * n_rows + 0.5), dpi=100)
        axes = fig.subplots(n_rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for r, (title, indices) in enumerate(rows):
            axes[r][0].set_ylabel(title, fontsize=9)
            for c, i in enumerate(indices):
                image, labels = reader.read(i)
                shown = asinh_stretch(image)
                ax = axes[r][c]
                ax.imshow(shown, cmap=None if shown.ndim == 3 else "magma", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_title(_caption(manifest, labels), fontsize=7)
        shape = "x".join(str(s) for s in manifest.image.shape)
        fig.suptitle(f"{Path(directory).name}: {split}, {shape} {manifest.image.dtype}, asinh stretch", fontsize=10)
        fig.tight_layout()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png)
    finally:
        reader.close()
    return out_png
