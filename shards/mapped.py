"""Images copied straight from memory-mapped shards into a batch: one copy per sample, nothing parsed.

Every image of a shard set has the manifest's shape and dtype, so every ``.npy`` member is the same header
followed by the same number of array bytes. Each shard is mapped once per process; when it is, the header
of every member is compared with one that ``np.load`` accepts (a vectorised check over the whole shard),
and the members whose header matches and whose bytes lie inside the file are read from then on as rows of
a numpy view of the map: as an ``(n, H*W*C)`` strided view when the members follow each other at a fixed
stride (as they do when every JSON member fits in one tar block), else by slicing. A member that fails the
check goes through :class:`~shards.reader.ShardReader`, which decodes it or names the damaged member.
The values are those ``np.load`` gives.
"""

from __future__ import annotations

import io
import math
import mmap
from dataclasses import dataclass

import numpy as np

from shards.reader import CorruptSampleError, ShardReader

MAX_HEADER_BYTES = 1 << 16  # an .npy header of an image is a few hundred bytes


@dataclass
class _MappedShard:
    """One mapped shard: ``ok[r]`` says whether member ``r`` is read from the map; ``rows`` is the strided
    view when the shard has a fixed stride, else ``flat`` and ``starts`` (in items) locate each member."""

    map: mmap.mmap
    ok: np.ndarray
    flat: np.ndarray
    starts: list[int]
    rows: np.ndarray | None


class MappedImages:
    """Gathers images of one split by index into a batch array; picklable (maps are opened per process)."""

    def __init__(self, reader: ShardReader):
        image = reader.manifest.image
        self.reader = reader
        self.shape, self.dtype = tuple(image.shape), np.dtype(image.dtype)
        self.count = math.prod(self.shape)
        self.nbytes = self.count * self.dtype.itemsize
        members = reader.members
        self.shard_of = np.asarray(reader.shard_of, dtype=np.int64)
        self.image_offset = np.array([m.image_offset for m in members], dtype=np.int64)
        self.image_size = np.array([m.image_size for m in members], dtype=np.int64)
        sizes = np.asarray(reader.shard_sizes, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(
            np.int64
        )  # reader order is shard by shard
        self.sizes = sizes
        self.row = (
            np.arange(len(members), dtype=np.int64) - self.first[self.shard_of]
        )  # position in its shard
        self._maps: dict[int, _MappedShard] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Write the images of samples ``indices`` into ``out`` (``(len(indices), *shape)``, any float dtype)."""
        flat_out = out.reshape(len(indices), self.count)
        shards, rows = self.shard_of[indices].tolist(), self.row[indices].tolist()
        count = self.count
        for k, (s, r) in enumerate(zip(shards, rows, strict=True)):
            shard = self._maps.get(s) or self._open(s)
            if not shard.ok[r]:
                out[k] = self._decode(int(indices[k]))
            elif shard.rows is not None:
                flat_out[k] = shard.rows[r]
            else:
                start = shard.starts[r]
                flat_out[k] = shard.flat[start : start + count]

    def _decode(self, index: int) -> np.ndarray:
        """A sample the map cannot serve, through the reader: decoded, or a named error."""
        image, _ = self.reader.read(index)
        if image.shape != self.shape:
            raise CorruptSampleError(
                f"{self.reader.where(index)}: image shape {image.shape} is not the manifest's {self.shape}"
            )
        return image

    def _open(self, s: int) -> _MappedShard:
        path = self.reader.shard_paths[s]
        try:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # missing, unreadable, or empty (mmap refuses an empty file)
            raise CorruptSampleError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        mine = slice(int(self.first[s]), int(self.first[s] + self.sizes[s]))
        data_start = self.image_offset[mine] + self.image_size[mine] - self.nbytes
        ok = self._headers_match(mm, self.image_offset[mine], data_start)
        item = self.dtype.itemsize
        ok &= (data_start % item == 0) & (data_start + self.nbytes <= len(mm))
        flat = np.frombuffer(mm, self.dtype, len(mm) // item)
        rows = None
        strides = np.diff(data_start)
        if ok.all() and len(ok) and (len(strides) == 0 or (strides == strides[0]).all()):
            stride = int(strides[0]) if len(strides) else self.nbytes
            rows = np.lib.stride_tricks.as_strided(
                flat[data_start[0] // item :],
                shape=(len(ok), self.count),
                strides=(stride, item),
                writeable=False,
            )
        shard = self._maps[s] = _MappedShard(mm, ok, flat, (data_start // item).tolist(), rows)
        return shard

    def _headers_match(self, mm: mmap.mmap, header_start: np.ndarray, data_start: np.ndarray) -> np.ndarray:
        """Per member: whether its ``.npy`` header is the bytes of the first member's header, when that one
        describes an array of the manifest's shape and dtype in C order."""
        ok = np.zeros(len(header_start), dtype=bool)
        if not len(header_start) or data_start[0] + self.nbytes > len(mm):
            return ok
        length = int(data_start[0] - header_start[0])
        if length <= 0 or length > MAX_HEADER_BYTES or header_start[0] < 0:
            return ok  # no .npy header of this size: every member goes through the reader, which names it
        header = bytes(mm[int(header_start[0]) : int(data_start[0])])
        if not self._valid_header(header):
            return ok
        fits = (data_start - header_start == length) & (data_start <= len(mm))
        starts = header_start[fits]
        raw = np.frombuffer(mm, np.uint8)
        found = raw[starts[:, None] + np.arange(length)]
        ok[fits] = (found == np.frombuffer(header, np.uint8)).all(axis=1)
        return ok

    def _valid_header(self, header: bytes) -> bool:
        try:
            array = np.load(io.BytesIO(header + bytes(self.nbytes)), allow_pickle=False)
        except Exception:
            return False
        return array.shape == self.shape and array.dtype == self.dtype and array.flags.c_contiguous
