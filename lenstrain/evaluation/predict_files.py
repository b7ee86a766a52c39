"""``lenstrain predict RUN --images PATH --out preds.csv``: predictions for image files, without packing them.

PATH is a file or a folder (searched recursively, in sorted order) of

- ``.npy`` arrays, read with ``allow_pickle=False`` (a pickled object array is refused, naming the file);
- FITS images (``.fits``, ``.fit``, ``.fts``, optionally ``.gz``), read with astropy: the first HDU with data.

A file holds one image, ``(H, W)`` or ``(C, H, W)``, or a stack ``(N, C, H, W)`` (or ``(N, H, W)`` for a
one-channel model). Images must have the run's channels and size: a mismatch is an error naming the file and
the shape the model takes. Pixels are normalised as the run was trained (``data.normalize`` with its shard set's
statistics), predicted in batches (with a progress bar on a terminal), averaged over the run's test-time
rotations, and written one row per image: ``file``, ``index`` (the image's place in its file), and the
prediction columns ``predict --shards`` writes.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lenstrain.checkpointing.rundir import write_atomic
from shards.clikit import UsageError

NPY_SUFFIXES = (".npy",)
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NPY_SUFFIXES):
        return "npy"
    if name.endswith(FITS_SUFFIXES):
        return "fits"
    return None


def image_files(path: Path) -> list[Path]:
    """The image files PATH names: itself, or every .npy / FITS file below it, sorted."""
    path = Path(path)
    if path.is_file():
        if _kind(path) is None:
            raise UsageError(f"--images {path}: not a .npy or FITS file ({', '.join(NPY_SUFFIXES + FITS_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise UsageError(f"--images {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
    if not files:
        raise UsageError(f"--images {path}: no .npy or FITS files in it")
    return files


def read_array(path: Path) -> np.ndarray:
    """The array in one file; UsageError naming the file when it cannot be read safely."""
    if _kind(path) == "npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise UsageError(f"{path}: a pickled (object) array; only plain numeric arrays are read, "
                                 f"nothing in a file runs code") from None
            raise UsageError(f"{path}: not a readable .npy array ({exc})") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot be read ({exc})") from None
        return array
    try:
        from astropy.io import fits
    except ImportError:  # pragma: no cover - astropy comes with lenstronomy
        raise UsageError(f"{path}: reading FITS needs astropy (pip install astropy)") from None
    try:
        with fits.open(path, memmap=False) as hdus:
            for hdu in hdus:
                if getattr(hdu, "data", None) is not None and getattr(hdu.data, "ndim", 0) >= 2:
                    return np.asarray(hdu.data)
    except OSError as exc:
        raise UsageError(f"{path}: not a readable FITS file ({exc})") from None
    raise UsageError(f"{path}: no image HDU in this FITS file")


def as_images(array: np.ndarray, path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """``array`` as a stack ``(N, C, H, W)`` of the model's ``shape``; UsageError naming the file otherwise."""
    c, h, w = shape
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise UsageError(f"{path}: holds {array.dtype} values; images are real numbers")
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        if array.shape[1:] == (h, w) and array.shape[0] == c:
            array = array[None]
        elif array.shape[1:] == (h, w) and c == 1:
            array = array[:, None]
        else:
            array = array[None]
    elif array.ndim != 4:
        raise UsageError(f"{path}: an array of shape {tuple(array.shape)}; the model takes images (C, H, W) = "
                         f"{shape}, (H, W), or a stack (N, C, H, W)")
    if array.shape[1] != c:
        raise UsageError(f"{path}: images with {array.shape[1]} channel(s) (shape {tuple(array.shape)}); the model "
                         f"was trained on {c} channel(s), (C, H, W) = {shape}")
    if tuple(array.shape[2:]) != (h, w):
        raise UsageError(f"{path}: images of {array.shape[2]}x{array.shape[3]} pixels; the model was trained on "
                         f"{h}x{w} (C, H, W) = {shape}; resample them first")
    if not np.isfinite(array).all():
        raise UsageError(f"{path}: holds NaN or infinite pixels")
    return np.ascontiguousarray(array, dtype=np.float32)


def batches(files: list[Path], shape: tuple[int, int, int], size: int) -> Iterator[tuple[np.ndarray, list]]:
    """Batches of at most ``size`` images and, for each, (file, index in file)."""
    images, where = [], []
    for path in files:
        stack = as_images(read_array(path), path, shape)
        for i in range(len(stack)):
            images.append(stack[i])
            where.append((path, i))
            if len(images) == size:
                yield np.stack(images), where
                images, where = [], []
    if images:
        yield np.stack(images), where


def count_images(files: list[Path], shape: tuple[int, int, int]) -> int:
    """Images in ``files`` (each read once, checked, and let go)."""
    return sum(len(as_images(read_array(p), p, shape)) for p in files)


def predict_files(run, images: Path, out: Path, rotations: int, batch_size: int, log) -> int:
    """Write predictions of ``run`` (a :class:`lenstrain.evaluation.evaluate.LoadedRun`) for the images under ``images``."""
    from lenstrain.data.normalize import NORMALIZERS
    from lenstrain.evaluation.inference import Outputs, decode
    from lenstrain.evaluation.inference import predict as predict_batches

    task, cfg = run.task, run.cfg
    shape = tuple(task.manifest.image.shape)
    files = image_files(images)
    total = count_images(files, shape)  # every file checked before any work
    stats = task.manifest.image.stats
    mean, std = (stats.mean, stats.std or 1.0) if stats else (0.0, 1.0)
    log(f"{run.run_dir}: {cfg.model.name} from checkpoint {run.checkpoint.name} ({run.why}); predicting "
        f"{task.target.name!r} for {total} image(s) in {len(files)} file(s) under {images}, batches of {batch_size}, "
        f"{rotations} rotation(s) averaged, normalised as trained ({cfg.data.normalize})")
    keys, parts = [], []

    def gen():
        for x, where in batches(files, shape, batch_size):
            start = len(keys)
            keys.extend(where)
            image = NORMALIZERS[cfg.data.normalize](torch.from_numpy(x), mean, std)
            yield {"image": image, "target": torch.zeros(len(x)), "index": torch.arange(start, start + len(x))}

    with _progress(total) as advance:
        for batch in gen():
            parts.append(predict_batches(run.model, run.backend, [batch], rotations, task.num_outputs))
            advance(len(batch["index"]))
    result = decode(task, Outputs.concat(parts, task.num_outputs))
    write_rows(Path(out), task.target, images, keys, result["pred"])
    log(f"wrote {len(keys)} rows to {out}")
    return 0


class _progress:
    """A rich progress bar on a terminal (stderr); nothing otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.bar.start()
            self.task = self.bar.add_task("predicting", total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_rows(path: Path, target, root: Path, keys: list[tuple[Path, int]], pred: torch.Tensor) -> None:
    classes = list(target.classes)
    header = ["file", "index", target.name]
    if target.kind == "classification":
        header += [f"prob_{c}" for c in classes]
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = io.StringIO(newline="")  # the whole file, then one atomic write
    writer = csv.writer(fh)
    writer.writerow(header)
    for row, (file, index) in enumerate(keys):
        name = str(file.relative_to(base)) if file.is_relative_to(base) else str(file)
        if target.kind == "classification":
            probs = pred[row].tolist()
            cells = [classes[int(pred[row].argmax())], *(_cell(p) for p in probs)]
        else:
            cells = [_cell(float(pred[row]))]
        writer.writerow([name, index, *cells])
    write_atomic(path, fh.getvalue())


def _cell(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.8g}"
