"""Import array data sets (an image array plus labels) into a shard set.

Images: ``(N,H,W)``, ``(N,C,H,W)``, or ``(N,H,W,C)`` with C in {1,3}, from a ``.npy`` file (memory-mapped,
never unpickled) or an in-memory array.

Labels: a 1-D ``.npy`` (one target, named by ``target_name``: ``class`` for classification, ``label``
otherwise), or a CSV file with a header whose columns are targets (the first column is the primary
target unless ``primary`` names another). Text columns are classification targets; numeric columns are
regression targets, except the primary one when ``classification`` is set. Classes are the sorted distinct
values and a sample stores its class index. Empty, ``nan`` and ``NA`` cells are missing (stored as
``null``), which the primary target may not have.

The split is stratified by class, or by quantile bins of a regression primary target. Each sample's JSON
holds its targets and ``index``, its row in the source.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shards.options import PackOptions
from shards.pack import PackResult, TargetSpec
from shards.sources.common import CHANNELS, SourceError, pack_source, sample_order

MISSING = {"", "nan", "NaN", "NA", "N/A", "null", "None"}


def image_layout(shape: tuple[int, ...]) -> str:
    """``nhw``, ``nchw`` or ``nhwc`` for an image array's shape."""
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4:
        if shape[1] in CHANNELS:
            return "nchw"
        if shape[3] in CHANNELS:
            return "nhwc"
    raise SourceError(f"images have shape {tuple(shape)}; expected (N,H,W), (N,C,H,W) or (N,H,W,C) with C in {{1,3}}")


def load_images(path: str | os.PathLike) -> np.ndarray:
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise SourceError(f"{path}: cannot read images ({type(exc).__name__}: {exc})") from exc
    if not isinstance(images, np.ndarray):
        raise SourceError(f"{path}: not a .npy array")
    return images


def load_labels(path: str | os.PathLike, target_name: str | None = None,
                classification: bool = False) -> dict[str, np.ndarray]:
    """Label columns by name, from a 1-D ``.npy`` or a CSV with a header (in the file's column order)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise SourceError(f"{path}: cannot read labels ({type(exc).__name__}: {exc})") from exc
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise SourceError(f"{path}: labels have shape {values.shape}; expected (N,) (use a CSV for several targets)")
        return {target_name or ("class" if classification else "label"): values}
    if target_name is not None:
        raise SourceError("--target-name names a .npy label array; a CSV's header names its columns (pick one with --target)")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot read labels ({exc})") from exc
    if len(rows) < 2:
        raise SourceError(f"{path}: expected a header line and at least one row")
    header = [h.strip() for h in rows[0]]
    if any(not h for h in header) or len(set(header)) != len(header):
        raise SourceError(f"{path}: header {header} must name every column once")
    body = rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise SourceError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
    return {name: np.asarray([row[j].strip() for row in body], dtype=object) for j, name in enumerate(header)}


def _parse_numeric(values: np.ndarray) -> np.ndarray | None:
    """Floats (NaN for missing) if every present value is a number, else None."""
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        text = str(v).strip()
        if text in MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(text)
        except ValueError:
            return None
    return out


def _class_name(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def encode_targets(columns: Mapping[str, np.ndarray], primary: str, classification: bool):
    """Turn label columns into (TargetSpecs, per-column lists of JSON values)."""
    if primary not in columns:
        raise SourceError(f"target {primary!r} is not among the label columns: {', '.join(columns)}")
    specs: list[TargetSpec] = []
    encoded: dict[str, list] = {}
    for name, raw in columns.items():
        raw = np.asarray(raw)
        numeric = _parse_numeric(raw)
        if numeric is not None and not (classification and name == primary):
            specs.append(TargetSpec(name, "regression"))
            encoded[name] = [None if np.isnan(v) else float(v) for v in numeric]
            continue
        if numeric is not None:
            present = [None if np.isnan(v) else float(v) for v in numeric]
            distinct = sorted({v for v in present if v is not None})
        else:
            present = [None if str(v).strip() in MISSING else str(v).strip() for v in raw]
            distinct = sorted({v for v in present if v is not None})
        classes = [_class_name(v) for v in distinct]
        index = {v: i for i, v in enumerate(distinct)}
        specs.append(TargetSpec(name, "classification", classes))
        encoded[name] = [None if v is None else index[v] for v in present]
    missing = [i for i, v in enumerate(encoded[primary]) if v is None]
    if missing:
        raise SourceError(f"primary target {primary!r} is missing in {len(missing)} rows (first: row {missing[0]})")
    return specs, encoded


class ArraySample:
    """Sample ``i`` of the packing order: one image row plus its labels. Picklable.

    Holds either an array or the path of a ``.npy`` that each process memory-maps on first use.
    """

    def __init__(self, images: np.ndarray | str, layout: str, order: np.ndarray, labels: dict[str, list],
                 index_name: str):
        self.images = images
        self.layout = layout
        self.order = order
        self.labels = labels
        self.index_name = index_name
        self._array: np.ndarray | None = images if isinstance(images, np.ndarray) else None

    def __getstate__(self):
        state = self.__dict__.copy()
        if not isinstance(self.images, np.ndarray):
            state["_array"] = None
        return state

    def _images(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.images, mmap_mode="r", allow_pickle=False)
        return self._array

    def __call__(self, i: int) -> tuple[np.ndarray, dict]:
        row = int(self.order[i])
        image = np.asarray(self._images()[row])
        if self.layout == "nhw":
            image = image[None]
        elif self.layout == "nhwc":
            image = np.moveaxis(image, 2, 0)
        labels = {name: values[row] for name, values in self.labels.items()}
        labels[self.index_name] = row
        return image, labels


def _check_columns(images: np.ndarray, labels: Mapping[str, np.ndarray]) -> int:
    """The number of samples, once the images are numbers and every label column has one value per image."""
    if images.dtype.kind not in "fiub":
        raise SourceError(f"images have dtype {images.dtype}, expected numbers")
    if not labels:
        raise SourceError("no label columns")
    n = len(images)
    for name, values in labels.items():
        if len(values) != n:
            raise SourceError(f"{n} images but {len(values)} values of label {name!r}")
    if n == 0:
        raise SourceError("no images")
    return n


def pack_arrays(images: np.ndarray | str | os.PathLike, labels: Mapping[str, np.ndarray], out: str | os.PathLike,
                options: PackOptions = PackOptions(), *, primary: str | None = None, classification: bool = False,
                source: dict | None = None) -> PackResult:
    """Pack ``images`` (an array, or a ``.npy`` path that is memory-mapped) with label ``columns``."""
    path = None
    if not isinstance(images, np.ndarray):
        path = str(Path(images).resolve())
        images = load_images(path)
    layout = image_layout(images.shape)
    n = _check_columns(images, labels)
    primary = primary or next(iter(labels))
    specs, encoded = encode_targets(labels, primary, classification)
    regression = next(s.kind for s in specs if s.name == primary) == "regression"
    order = sample_order(n, options.seed)
    info = {
        "kind": "arrays",
        "images": path,
        "layout": layout,
        "n": n,
        "stratify": f"{primary} (quantile bins)" if regression else primary,
        **(source or {}),
    }
    index_name = "index" if "index" not in labels else "source_index"
    sample_fn = ArraySample(path if path is not None else images, layout, order, encoded, index_name)
    return pack_source(out, sample_fn, np.asarray([encoded[primary][j] for j in order]), targets=specs,
                       primary_target=primary, source=info, options=options, regression=regression,
                       describe=lambda i: f"{path or 'images'}[{int(order[i])}]")
