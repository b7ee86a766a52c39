"""Indexed reading of a shard set: one seek and one read per sample, no tar scan."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from shards.labeltable import label_column
from shards.manifest import Manifest, Member, load_manifest


class CorruptSampleError(ValueError):
    """A member that cannot be decoded; the message names the shard and member."""


def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise CorruptSampleError(f"{where}: cannot decode image ({exc})") from exc


def decode_labels(data: bytes, where: str) -> dict:
    try:
        return json.loads(data)
    except Exception as exc:
        raise CorruptSampleError(f"{where}: cannot decode labels ({exc})") from exc


class ShardReader:
    """Random access to the samples of one split, by position in the manifest's order.

    File handles are opened lazily and per process, so a reader can be handed to DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike, split: str, manifest: Manifest | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or load_manifest(self.directory)
        self.split = split
        shards = self.manifest.split(split).shards
        self._paths = [self.directory / s.name for s in shards]
        self._shard_of: list[int] = []
        self._members = []
        for si, shard in enumerate(shards):
            self._shard_of.extend([si] * len(shard.members))
            self._members.extend(shard.members)
        self.shard_sizes = [len(s.members) for s in shards]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._members)

    @property
    def members(self) -> list[Member]:
        """Every sample's member record, in reader order."""
        return self._members

    @property
    def shard_paths(self) -> list[Path]:
        return self._paths

    @property
    def shard_of(self) -> list[int]:
        """The shard (an index into :attr:`shard_paths`) of every sample."""
        return self._shard_of

    def label_column(self, name: str) -> np.ndarray | None:
        """Target ``name`` for every sample from the manifest's label table (NaN where a sample has none), or
        ``None`` when the table has no such column: then :meth:`labels` reads it from the JSON member."""
        return label_column(self.manifest.split(self.split), name)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # forked: never share file offsets with the parent
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            try:
                fh = self._handles[shard] = open(self._paths[shard], "rb", buffering=0)  # noqa: SIM115
            except OSError as exc:
                raise CorruptSampleError(f"{self._paths[shard]}: cannot be opened ({exc.strerror or exc})") from None
        return fh

    def _read_at(self, index: int, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` of sample ``index``'s shard; a span outside the file is named, not read."""
        fh = self._handle(self._shard_of[index])
        end = os.fstat(fh.fileno()).st_size
        if offset < 0 or size < 0 or offset + size > end:
            raise CorruptSampleError(f"{self.where(index)}: shard is truncated (the sample's data, bytes {offset}-"
                                     f"{offset + size}, lies past its {end} bytes) or the manifest is wrong")
        data = os.pread(fh.fileno(), size, offset)
        if len(data) != size:
            raise CorruptSampleError(f"{self.where(index)}: shard is truncated")
        return data

    def where(self, index: int) -> str:
        member = self._members[index]
        return f"{self._paths[self._shard_of[index]].name}:{member.key}"

    def read_raw(self, index: int) -> tuple[bytes, bytes]:
        """The image and label bytes of sample ``index``, read with one contiguous read."""
        m = self._members[index]
        span = m.json_offset + m.json_size - m.image_offset
        data = self._read_at(index, span, m.image_offset)
        return data[: m.image_size], data[m.json_offset - m.image_offset :]

    def read(self, index: int) -> tuple[np.ndarray, dict]:
        image_bytes, json_bytes = self.read_raw(index)
        where = self.where(index)
        return decode_image(image_bytes, where), decode_labels(json_bytes, where)

    def labels(self, index: int) -> dict:
        m = self._members[index]
        return decode_labels(self._read_at(index, m.json_size, m.json_offset), self.where(index))

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}
