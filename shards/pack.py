"""Pack samples into a shard set: parallel sample production, ordered deterministic tar writing.

The output is byte-identical for a given input whatever the number of workers: samples are produced
by a pure function of their index, and the parent process writes them in index order.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.atomic import fsync_dir
from shards.labeltable import LabelTableWriter
from shards.manifest import MANIFEST_NAME, SPLITS, ImageInfo, Manifest, save_manifest
from shards.moments import Moments
from shards.options import PackOptions
from shards.packstats import PackStatistics, TargetSpec  # TargetSpec: importers use shards.pack's name
from shards.progress import progress
from shards.tarshard import SplitShards, crc32s, encode_image, encode_labels

SampleFn = Callable[[int], tuple[np.ndarray, dict]]


class BadSample(ValueError):
    """A source sample that cannot be packed (unreadable, mis-shaped, non-finite)."""


class OutputExistsError(FileExistsError):
    pass


@dataclass
class PackResult:
    manifest: Manifest
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """One sample as a worker hands it to the writer: its two tar members, ready to append."""

    index: int
    image_bytes: bytes
    json_bytes: bytes
    labels: dict
    shape: tuple[int, ...]
    pixels: Moments  # of the stored (cast) image
    crcs: tuple[int, int]


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str


# --------------------------------------------------------------------------- producing samples

# The sample function travels to worker processes once, through the pool initializer.
_WORKER_FN: SampleFn | None = None
_WORKER_DTYPE = "float32"


def _init_worker(fn: SampleFn | None, dtype: str) -> None:
    global _WORKER_FN, _WORKER_DTYPE
    _WORKER_FN, _WORKER_DTYPE = fn, dtype


def _init_pool_worker(fn: SampleFn, dtype: str) -> None:
    # A forked worker inherits the parent's Python signal handlers. Python runs those in the main thread
    # only, so a worker blocked on the task queue could miss the SIGTERM of Pool.terminate() and hang it.
    # Workers take SIGTERM's default action and leave SIGINT (Ctrl-C) to the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(fn, dtype)
    try:  # one BLAS thread per worker: the pool is the parallelism
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except Exception:  # pragma: no cover - optional
        pass


def _stored_image(image: np.ndarray, dtype: str) -> np.ndarray:
    """``image`` cast to the stored dtype, or :class:`BadSample` if it is not a finite ``(C,H,W)`` image."""
    if image.ndim != 3:
        raise BadSample(f"image has shape {image.shape}, expected (C, H, W)")
    if not np.isfinite(image).all():
        raise BadSample("image holds NaN or Inf values")
    with np.errstate(over="ignore"):
        cast = image.astype(dtype)
    if not np.isfinite(cast).all():
        raise BadSample(f"image values overflow {dtype} (max |value| {float(np.abs(image).max()):.4g})")
    return cast


def _produce(index: int) -> Encoded | Rejected:
    assert _WORKER_FN is not None
    try:
        image, labels = _WORKER_FN(index)
        cast = _stored_image(np.asarray(image), _WORKER_DTYPE)
    except BadSample as exc:
        return Rejected(index, str(exc))
    image_bytes, json_bytes = encode_image(cast, _WORKER_DTYPE), encode_labels(labels)
    # the CRCs and moments are computed here, off the writing process
    return Encoded(index, image_bytes, json_bytes, labels, tuple(cast.shape), Moments.of(cast),
                   crc32s(image_bytes, json_bytes))


def _iter_results(fn: SampleFn, order: list[int], dtype: str, workers: int):
    if workers <= 1:
        _init_worker(fn, dtype)
        try:
            for i in order:
                yield _produce(i)
        finally:
            _init_worker(None, "float32")  # do not keep the source (maybe a large array) alive
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    chunk = max(1, min(64, len(order) // (workers * 8) or 1))
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(fn, dtype)) as pool:
        yield from pool.imap(_produce, order, chunksize=chunk)


# --------------------------------------------------------------------------- the output directory

def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and anything but a shard set or an empty directory."""
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not (out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))):
        raise OutputExistsError(f"{out} exists and is not a shard set (no {MANIFEST_NAME}); refusing to replace it")


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check the destination and return a fresh staging directory beside it."""
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a shard set is for the whole team to read
    return staging


def lock_path(out: Path) -> Path:
    """The lock file beside ``--out`` that one writer of that shard set holds (``.NAME.lock``)."""
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``out`` (``.NAME.lock``) while a shard set is written there; a second writer
    of the same ``out`` is refused at once (:class:`OutputExistsError`, exit 2) rather than racing the first.
    The lock file is removed when the set is published or given up."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    while True:
        fh = open(path, "a")  # noqa: SIM115 - held until the set is published
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise OutputExistsError(f"{out} is being written by another process (it holds {path}); wait for it to "
                                    f"finish, or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # a holder removed this lock file as we opened it: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still held: whoever opens it next makes a new one
        fh.close()


def publish(staging: Path, out: Path, overwrite: bool = True) -> None:
    """Move a finished staging directory into place; an old set is removed only after that.

    A set that appeared at ``out`` while this one was written (by a writer that did not take the lock) is
    left as it is unless ``overwrite``."""
    trash = None
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out} appeared while this shard set was being written; it is left as it is. "
                                    f"Choose another --out, or pass --overwrite to replace it")
        check_destination(out, overwrite)
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
    try:
        os.rename(staging, out)  # a directory that appeared meanwhile, non-empty, makes this fail: never replaced
    except OSError as exc:
        if trash is not None:
            os.replace(trash, out)
        raise OutputExistsError(f"{out} appeared while this shard set was being written ({exc.strerror}); it is "
                                f"left as it is") from None
    fsync_dir(out.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- packing

def _packing_order(split_of: Sequence[str]) -> list[int]:
    """Sample indices grouped by split (train, val, test), each group in index order."""
    unknown = set(split_of) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; valid: {', '.join(SPLITS)}")
    return [i for s in SPLITS for i, sp in enumerate(split_of) if sp == s]


class _Packer:
    """Writes produced samples into shards in packing order, gathering statistics and skipped samples."""

    def __init__(self, staging: Path, split_of: Sequence[str], targets: Sequence[TargetSpec],
                 options: PackOptions, key_of: Callable[[int], str], describe: Callable[[int], str]):
        present = [s for s in SPLITS if s in set(split_of)]
        self.split_of, self.options, self.key_of, self.describe = split_of, options, key_of, describe
        self.shards = SplitShards(staging, options.shard_size, present)
        self.stats = PackStatistics(targets, present)
        self.tables = {s: LabelTableWriter([t.name for t in targets]) for s in present}
        self.skipped: list[str] = []
        self.shape: tuple[int, ...] | None = None

    def add(self, result: Encoded | Rejected) -> None:
        if isinstance(result, Rejected):
            return self._reject(result.index, result.reason)
        if self.shape is None:
            self.shape = result.shape
        elif result.shape != self.shape:
            return self._reject(result.index, f"image shape {result.shape} differs from the first sample's {self.shape}")
        split = self.split_of[result.index]
        self.shards.add(split, self.key_of(result.index), result.image_bytes, result.json_bytes, result.crcs)
        self.stats.add(split, result.labels, result.pixels)
        self.tables[split].add(result.labels)

    def _reject(self, index: int, reason: str) -> None:
        message = f"{self.describe(index)}: {reason}"
        if not self.options.skip_bad:
            raise BadSample(message + " (pass --skip-bad to skip such samples)")
        self.skipped.append(message)

    def manifest(self, primary_target: str, source: dict) -> Manifest:
        splits = self.shards.close()
        if self.shape is None:
            raise BadSample("no sample could be packed")
        for name, split in splits.items():
            split.labels = self.tables[name].table()
        pixels = ImageInfo(shape=self.shape, dtype=self.options.dtype, stats=self.stats.pixels.stats())
        return Manifest(image=pixels, primary_target=primary_target, targets=self.stats.manifest_targets(),
                        splits=splits, source={**source, "skipped": len(self.skipped)})


def pack_shard_set(
    out: str | os.PathLike, *, sample_fn: SampleFn, split_of: Sequence[str], targets: Sequence[TargetSpec],
    primary_target: str, source: dict, options: PackOptions = PackOptions(),
    key_of: Callable[[int], str] | None = None, describe: Callable[[int], str] | None = None, desc: str = "packing",
) -> PackResult:
    """Write samples ``0..len(split_of)-1`` into a shard set at ``out``.

    ``sample_fn(i)`` returns ``(image (C,H,W), labels dict)`` and must be picklable. ``split_of[i]``
    names the split of sample i. ``describe(i)`` names a sample in error messages (e.g. its file).
    ``options`` gives the shard size, dtype, workers, ``overwrite`` and ``skip_bad`` (the split fractions
    and seed are the caller's, already in ``split_of``). The manifest is written last and the directory
    appears at ``out`` only when complete.
    """
    if primary_target not in {t.name for t in targets}:
        raise ValueError(f"primary target {primary_target!r} is not among the targets")
    out, order = Path(out), _packing_order(split_of)
    with output_lock(out):
        staging = prepare_output(out, options.overwrite)
        try:
            packer = _Packer(staging, split_of, targets, options, key_of or (lambda i: f"{i:08d}"),
                             describe or (lambda i: f"sample {i}"))
            with progress(total=len(order), desc=desc) as bar:
                for result in _iter_results(sample_fn, order, options.dtype, options.workers):
                    packer.add(result)
                    bar.update(1)
            manifest = packer.manifest(primary_target, source)
            fsync_dir(staging)
            save_manifest(staging, manifest)
            publish(staging, out, options.overwrite)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.filename is not None or isinstance(exc, OutputExistsError):
                raise
            # A write error (a full disk, a quota) carries no file name: name the set and where it was written.
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing the shard set {out} (nothing was "
                                     f"published)", str(staging)) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return PackResult(manifest=manifest, skipped=packer.skipped)
