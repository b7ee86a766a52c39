"""Import DeepLense-style ``.npy`` class folders into a shard set.

Layouts (the folder names are the classes, sorted):

- ``SRC/<class>/**/*.npy``, e.g. ``Model_I/{axion,cdm,no_sub}/``;
- ``SRC/<split>/<class>/*.npy`` with ``<split>`` among train/val/valid/validation/test, e.g. the
  ``dataset/{train,val}/{no,sphere,vort}/`` folders of DeepLense's common test. These are pooled and
  split again, stratified by class, so that the shard set's splits follow ``--val``/``--test``/``--seed``.

A file holds one sample: a numeric image ``(H,W)``, ``(C,H,W)`` or ``(H,W,C)`` with C in {1,3}, or an
object array ``[image, value]`` as DeepLense stores its axion samples (``[image, axion_mass]``). Object
arrays are read by a restricted unpickler (:mod:`shards.sources.npyfile`): numpy arrays, dtypes and numbers
only, anything else is refused and the file named. The shards themselves never hold pickles.

Targets:

- ``class`` (classification, primary): the folder's index in the sorted class list;
- a regression target when object arrays carry a numeric second element. It is named ``axion_mass`` when
  only the ``axion`` folder carries values and ``label_value`` otherwise (``value_name`` overrides).
  Whether a class carries values is read from its first file; samples without a value store ``null``,
  and the target's statistics count only the samples that have one.

Each sample's JSON holds ``class``, ``class_name``, the value target if any, and ``file`` (the path
relative to ``SRC``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from shards.options import PackOptions
from shards.pack import BadSample, PackResult, TargetSpec
from shards.sources.common import SourceError, check_shape, pack_source, sample_order, to_chw
from shards.sources.npyfile import read_npy

SPLIT_DIRS = {"train", "training", "val", "valid", "validation", "test", "testing"}
PROBE_FILES = 5


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _npy_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.npy") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))


def scan(root: str | os.PathLike) -> tuple[list[str], list[str], list[int], str]:
    """Find the samples under ``root``: (classes, files relative to root, class index per file, layout)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    top = _subdirs(root)
    if not top:
        raise SourceError(f"{root}: no class folders (expected e.g. {root}/axion/*.npy)")
    layout = "class-folders"
    folders: dict[str, list[Path]] = {d.name: [d] for d in top}
    if all(d.name.lower() in SPLIT_DIRS for d in top) and all(_subdirs(d) for d in top):
        layout = "split-folders"
        folders = {}
        for d in top:
            for c in _subdirs(d):
                folders.setdefault(c.name, []).append(c)
    classes = sorted(folders)
    files: list[str] = []
    class_index: list[int] = []
    for ci, name in enumerate(classes):
        found = [p for d in folders[name] for p in _npy_files(d)]
        if not found:
            raise SourceError(f"{folders[name][0]}: class folder holds no .npy files")
        files.extend(p.relative_to(root).as_posix() for p in found)
        class_index.extend([ci] * len(found))
    return classes, files, class_index, layout


def _numeric(value) -> float | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "fiu":
        return float(value.reshape(()))
    return None


def split_record(arr: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Split a loaded file into (image, numeric value or None)."""
    if not arr.dtype.hasobject:
        return arr, None
    if arr.ndim == 0:
        item = arr.item()
        items = list(item) if isinstance(item, list | tuple) else [item]
    elif arr.ndim == 1:
        items = list(arr)
    else:  # an image that was saved with dtype=object
        items = [arr]
    if not items:
        raise BadSample("empty object array")
    image = np.asarray(items[0])
    if image.dtype.hasobject:
        try:
            image = image.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise BadSample(f"first element is not a numeric image ({exc})") from exc
    value = _numeric(items[1]) if len(items) > 1 else None
    if value is not None and not np.isfinite(value):
        raise BadSample(f"label value {value} is not finite")
    return image, value


class DeepLenseSample:
    """Sample ``i`` of the packing order: reads, checks and labels one file. Picklable."""

    def __init__(self, root: str, files: list[str], class_index: list[int], classes: list[str],
                 value_name: str | None, shape: tuple[int, int, int] | None):
        self.root = root
        self.files = files
        self.class_index = class_index
        self.classes = classes
        self.value_name = value_name
        self.shape = shape

    def __call__(self, i: int) -> tuple[np.ndarray, dict]:
        rel = self.files[i]
        image, value = split_record(read_npy(os.path.join(self.root, rel)))
        image = check_shape(to_chw(image), self.shape)
        ci = self.class_index[i]
        labels: dict = {"class": ci, "class_name": self.classes[ci]}
        if self.value_name is not None:
            labels[self.value_name] = value
        labels["file"] = rel
        return image, labels


def probe(root: Path, files: list[str], class_index: list[int], n_classes: int):
    """Read the first readable files of each class: the common image shape and the classes with values."""
    shapes: Counter = Counter()
    valued: list[int] = []
    first_of: dict[int, list[str]] = {}
    for rel, ci in zip(files, class_index, strict=True):
        bucket = first_of.setdefault(ci, [])
        if len(bucket) < PROBE_FILES:
            bucket.append(rel)
    for ci in range(n_classes):
        for rel in first_of.get(ci, []):
            try:
                image, value = split_record(read_npy(root / rel))
                shape = tuple(to_chw(image).shape)
            except BadSample:
                continue
            shapes[shape] += 1
            if value is not None:
                valued.append(ci)
            break
    shape = shapes.most_common(1)[0][0] if shapes else None
    return shape, valued


def _value_target(classes: list[str], valued: list[int], value_name: str | None) -> str | None:
    """The name of the regression target carried by ``[image, value]`` files, if any class carries one."""
    if not valued:
        return None
    name = value_name or ("axion_mass" if [classes[c] for c in valued] == ["axion"] else "label_value")
    if name in ("class", "class_name", "file"):
        raise SourceError(f"value target name {name!r} is reserved")
    return name


def import_deeplense(src: str | os.PathLike, out: str | os.PathLike, options: PackOptions = PackOptions(), *,
                     value_name: str | None = None) -> PackResult:
    root = Path(src)
    classes, files, class_index, layout = scan(root)
    shape, valued = probe(root, files, class_index, len(classes))
    value_target = _value_target(classes, valued, value_name)
    order = sample_order(len(files), options.seed)
    files = [files[j] for j in order]
    class_index = [class_index[j] for j in order]
    targets = [TargetSpec("class", "classification", classes)]
    if value_target:
        targets.append(TargetSpec(value_target, "regression"))
    source = {
        "kind": "deeplense",
        "path": str(root.resolve()),
        "layout": layout,
        "classes": classes,
        "files": len(files),
        "value_target": value_target,
        "value_classes": [classes[c] for c in valued],
        "stratify": "class",
    }
    sample_fn = DeepLenseSample(str(root), files, class_index, classes, value_target, shape)
    return pack_source(out, sample_fn, np.asarray(class_index), targets=targets, primary_target="class",
                       source=source, options=options, describe=lambda i: str(root / files[i]))
