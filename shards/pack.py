"""Pack samples into a shard set: parallel sample production, ordered deterministic tar writing.

The output is byte-identical for a given input whatever the number of workers: samples are produced
by a pure function of their index, and the parent process writes them in index order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.manifest import (
    MANIFEST_NAME,
    SPLITS,
    ImageInfo,
    Manifest,
    Member,
    Shard,
    Split,
    Stats,
    Target,
    fsync_dir,
    save_manifest,
)
from shards.progress import progress

SampleFn = Callable[[int], tuple[np.ndarray, dict]]


class BadSample(ValueError):
    """A source sample that cannot be packed (unreadable, mis-shaped, non-finite)."""


class OutputExistsError(FileExistsError):
    pass


@dataclass(frozen=True)
class TargetSpec:
    name: str
    kind: str  # "regression" | "classification"
    classes: list[str] | None = None


@dataclass
class PackResult:
    manifest: Manifest
    skipped: list[str] = field(default_factory=list)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_image(image: np.ndarray, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def encode_labels(labels: dict) -> bytes:
    return json.dumps(labels, sort_keys=True, separators=(",", ":")).encode()


class _HashingFile:
    """A write-only file that hashes what passes through it (saves a second read of every shard)."""

    def __init__(self, path: Path):
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._hash = hashlib.sha256()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self._hash.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def finish(self) -> tuple[str, int]:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._hash.hexdigest(), self._pos


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ShardWriter:
    """Writes one tar shard and records the offsets of its members."""

    def __init__(self, path: Path):
        self.path = path
        self._file = _HashingFile(path)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.members: list[Member] = []

    def add(self, key: str, image_bytes: bytes, json_bytes: bytes, crcs: tuple[int, int] | None = None) -> None:
        image_crc, json_crc = crcs or (zlib.crc32(image_bytes), zlib.crc32(json_bytes))
        image_offset = self._add(f"{key}.image.npy", image_bytes)
        json_offset = self._add(f"{key}.json", json_bytes)
        self.members.append(Member(key=key, image_offset=image_offset, image_size=len(image_bytes),
                                   json_offset=json_offset, json_size=len(json_bytes),
                                   image_crc32=image_crc, json_crc32=json_crc))

    def _add(self, name: str, data: bytes) -> int:
        """Append one member and return the byte offset of its data in the tar."""
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded

    def close(self) -> Shard:
        self._tar.close()
        digest, size = self._file.finish()
        return Shard(name=self.path.name, count=len(self.members), bytes=size, sha256=digest, members=self.members)


class _RunningStats:
    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.n += v.size
        self.total += float(v.sum())
        self.total_sq += float(np.square(v).sum())
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))

    def result(self) -> Stats | None:
        if self.n == 0:
            return None
        mean = self.total / self.n
        var = max(self.total_sq / self.n - mean * mean, 0.0)
        return Stats(mean=mean, std=math.sqrt(var), min=self.lo, max=self.hi, count=self.n)


# The sample function travels to worker processes once, through the pool initializer.
_WORKER_FN: SampleFn | None = None
_WORKER_DTYPE = "float32"


def _init_worker(fn: SampleFn, dtype: str) -> None:
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


def _produce(index: int):
    assert _WORKER_FN is not None
    try:
        image, labels = _WORKER_FN(index)
        image = np.asarray(image)
        if image.ndim != 3:
            raise BadSample(f"image has shape {image.shape}, expected (C, H, W)")
        if not np.isfinite(image).all():
            raise BadSample("image holds NaN or Inf values")
        with np.errstate(over="ignore"):
            cast = image.astype(_WORKER_DTYPE)
        if not np.isfinite(cast).all():
            raise BadSample(f"image values overflow {_WORKER_DTYPE} (max |value| {float(np.abs(image).max()):.4g})")
        stats = (float(cast.sum(dtype=np.float64)), float(np.square(cast, dtype=np.float64).sum()),
                 float(cast.min()), float(cast.max()), cast.size, image.shape)
        image_bytes, json_bytes = encode_image(cast, _WORKER_DTYPE), encode_labels(labels)
        crcs = (zlib.crc32(image_bytes), zlib.crc32(json_bytes))  # computed here, off the writing process
        return index, image_bytes, json_bytes, labels, stats, crcs, None
    except BadSample as exc:
        return index, None, None, None, None, None, str(exc)


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


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check the destination and return a fresh staging directory beside it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not _replaceable(out):
        raise OutputExistsError(f"{out} exists and is not a shard set (no {MANIFEST_NAME}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a shard set is for the whole team to read
    return staging


def _replaceable(out: Path) -> bool:
    """Only a shard set or an empty directory may be replaced by ``overwrite``."""
    return out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging directory into place; an old set is removed only after that."""
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def pack_shard_set(
    out: str | os.PathLike,
    *,
    sample_fn: SampleFn,
    split_of: Sequence[str],
    targets: Sequence[TargetSpec],
    primary_target: str,
    source: dict,
    key_of: Callable[[int], str] | None = None,
    shard_size: int = 1000,
    dtype: str = "float32",
    workers: int = 1,
    overwrite: bool = False,
    skip_bad: bool = False,
    describe: Callable[[int], str] | None = None,
    desc: str = "packing",
) -> PackResult:
    """Write samples ``0..len(split_of)-1`` into a shard set at ``out``.

    ``sample_fn(i)`` returns ``(image (C,H,W), labels dict)`` and must be picklable. ``split_of[i]``
    names the split of sample i. ``describe(i)`` names a sample in error messages (e.g. its file).
    The manifest is written last and the directory appears at ``out`` only when complete.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if primary_target not in {t.name for t in targets}:
        raise ValueError(f"primary target {primary_target!r} is not among the targets")
    out = Path(out)
    key_of = key_of or (lambda i: f"{i:08d}")
    describe = describe or (lambda i: f"sample {i}")
    by_split = {s: [i for i, sp in enumerate(split_of) if sp == s] for s in SPLITS}
    unknown = set(split_of) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; valid: {', '.join(SPLITS)}")
    order = [i for s in SPLITS for i in by_split[s]]

    staging = prepare_output(out, overwrite)
    try:
        splits: dict[str, Split] = {s: Split() for s in SPLITS if by_split[s]}
        pixel = _RunningStats()
        target_stats = {t.name: _RunningStats() for t in targets if t.kind == "regression"}
        class_counts = {t.name: {s: dict.fromkeys(t.classes or [], 0) for s in splits} for t in targets
                        if t.kind == "classification"}
        class_names = {t.name: dict(enumerate(t.classes or [])) for t in targets}
        skipped: list[str] = []
        shape = None
        writer: _ShardWriter | None = None
        current_split = None
        results = _iter_results(sample_fn, order, dtype, workers)
        with progress(total=len(order), desc=desc) as bar:
            for index, image_bytes, json_bytes, labels, stats, crcs, error in results:
                bar.update(1)
                split = split_of[index]
                if error is not None:
                    message = f"{describe(index)}: {error}"
                    if not skip_bad:
                        raise BadSample(message + " (pass --skip-bad to skip such samples)")
                    skipped.append(message)
                    continue
                if shape is None:
                    shape = stats[5]
                elif stats[5] != shape:
                    message = f"{describe(index)}: image shape {stats[5]} differs from the first sample's {shape}"
                    if not skip_bad:
                        raise BadSample(message + " (pass --skip-bad to skip such samples)")
                    skipped.append(message)
                    continue
                if writer is not None and (split != current_split or len(writer.members) >= shard_size):
                    splits[current_split].shards.append(writer.close())
                    writer = None
                if writer is None:
                    current_split = split
                    writer = _ShardWriter(staging / shard_name(split, len(splits[split].shards)))
                writer.add(key_of(index), image_bytes, json_bytes, crcs)
                splits[split].count += 1
                if split == "train":
                    total, total_sq, lo, hi, size, _ = stats
                    pixel.n += size
                    pixel.total += total
                    pixel.total_sq += total_sq
                    pixel.lo, pixel.hi = min(pixel.lo, lo), max(pixel.hi, hi)
                    for name, rs in target_stats.items():
                        if labels.get(name) is not None:  # a target that only some samples carry
                            rs.add(np.asarray([labels[name]], dtype=np.float64))
                for name, counts in class_counts.items():
                    if labels.get(name) is not None:
                        cls = class_names[name].get(labels[name], str(labels[name]))
                        counts[split][cls] = counts[split].get(cls, 0) + 1
            if writer is not None:
                splits[current_split].shards.append(writer.close())
        if shape is None:
            raise BadSample("no sample could be packed")
        manifest = Manifest(
            image=ImageInfo(shape=shape, dtype=dtype, stats=pixel.result()),
            primary_target=primary_target,
            targets={
                t.name: Target(
                    kind=t.kind,
                    classes=t.classes,
                    stats=target_stats[t.name].result() if t.name in target_stats else None,
                    class_counts=class_counts.get(t.name),
                )
                for t in targets
            },
            splits={s: sp for s, sp in splits.items() if sp.count},
            source={**source, "skipped": len(skipped)},
        )
        fsync_dir(staging)
        save_manifest(staging, manifest)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackResult(manifest=manifest, skipped=skipped)
