"""Writing tar shards: reproducible member headers, sha256 while writing, and every member's data offset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

from shards.manifest import Member, Shard, Split


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_image(image: np.ndarray, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def encode_labels(labels: dict) -> bytes:
    return json.dumps(labels, sort_keys=True, separators=(",", ":")).encode()


def crc32s(image_bytes: bytes, json_bytes: bytes) -> tuple[int, int]:
    return zlib.crc32(image_bytes), zlib.crc32(json_bytes)


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


class ShardWriter:
    """Writes one tar shard and records the offsets of its members."""

    def __init__(self, path: Path):
        self.path = path
        self._file = _HashingFile(path)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.members: list[Member] = []

    def add(self, key: str, image_bytes: bytes, json_bytes: bytes, crcs: tuple[int, int]) -> None:
        image_offset = self._add(f"{key}.image.npy", image_bytes)
        json_offset = self._add(f"{key}.json", json_bytes)
        self.members.append(Member(key=key, image_offset=image_offset, image_size=len(image_bytes),
                                   json_offset=json_offset, json_size=len(json_bytes),
                                   image_crc32=crcs[0], json_crc32=crcs[1]))

    def _add(self, name: str, data: bytes) -> int:
        """Append one member and return the byte offset of its data in the tar."""
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded

    def close(self) -> Shard:
        self._tar.close()
        digest, size = self._file.finish()
        return Shard(name=self.path.name, count=len(self.members), bytes=size, sha256=digest, members=self.members)


class SplitShards:
    """Fills ``{split}-{i:06d}.tar`` files in ``directory`` with samples in packing order.

    A shard holds one split and at most ``shard_size`` samples; a new one starts when either changes.
    """

    def __init__(self, directory: Path, shard_size: int, splits: list[str]):
        self.directory = directory
        self.shard_size = shard_size
        self.splits: dict[str, Split] = {s: Split() for s in splits}
        self._writer: ShardWriter | None = None
        self._split: str | None = None

    def add(self, split: str, key: str, image_bytes: bytes, json_bytes: bytes, crcs: tuple[int, int]) -> None:
        if self._writer is not None and (split != self._split or len(self._writer.members) >= self.shard_size):
            self._finish_shard()
        if self._writer is None:
            self._split = split
            self._writer = ShardWriter(self.directory / shard_name(split, len(self.splits[split].shards)))
        self._writer.add(key, image_bytes, json_bytes, crcs)
        self.splits[split].count += 1

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._split is not None
        self.splits[self._split].shards.append(self._writer.close())
        self._writer = None

    def close(self) -> dict[str, Split]:
        """Finish the last shard; the splits that received samples, in packing order."""
        if self._writer is not None:
            self._finish_shard()
        return {s: split for s, split in self.splits.items() if split.count}
