"""The shard-set manifest: the single source of truth for counts, shapes, label statistics and checksums.

A shard set is a directory holding ``manifest.json`` and ``{split}-{i:06d}.tar``. Each sample in a tar is
``KEY.image.npy`` (a float16/float32 ``(C,H,W)`` array saved without pickle) and ``KEY.json`` (labels and
parameters). The manifest also records each member's byte offset, so readers can seek instead of scanning,
and, since 2026-12, each split's label table: every target's value per sample, so that training reads no
JSON member. Both additions are optional fields: shard sets written before them stay readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_NAME = "lenstrain-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stats(_Strict):
    mean: float
    std: float
    min: float
    max: float
    count: int


class Target(_Strict):
    kind: Literal["regression", "classification"]
    classes: list[str] | None = None
    stats: Stats | None = None  # train split only
    class_counts: dict[str, dict[str, int]] | None = None  # split -> class -> count


class ImageInfo(_Strict):
    shape: tuple[int, int, int]  # (C, H, W)
    dtype: Literal["float16", "float32"]
    stats: Stats | None = None  # pixel statistics over the train split


class Member(_Strict):
    """One sample's position inside its tar: the data offsets and sizes of its two members."""

    key: str
    image_offset: int
    image_size: int
    json_offset: int
    json_size: int
    # CRC-32 of each member's data, so that verification can name the member a damaged shard lost.
    image_crc32: int | None = None
    json_crc32: int | None = None


class Shard(_Strict):
    name: str
    count: int
    bytes: int
    sha256: str
    members: list[Member]


class Split(_Strict):
    count: int = 0
    shards: list[Shard] = Field(default_factory=list)
    # The label table: for a target, its value for every sample of the split, in the shards' member order
    # (null where a sample has none). A target whose labels are not all numbers or null has no column; a
    # shard set packed before the table existed has none at all (readers then read the JSON members).
    labels: dict[str, list[float | None]] | None = None


class Manifest(_Strict):
    format: Literal["lenstrain-shards"] = FORMAT_NAME
    version: int = FORMAT_VERSION
    image: ImageInfo
    primary_target: str
    targets: dict[str, Target]
    splits: dict[str, Split]
    source: dict = Field(default_factory=dict)

    @property
    def target(self) -> Target:
        return self.targets[self.primary_target]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in shard set; it has: {', '.join(self.splits)}")
        return self.splits[name]


class ManifestError(ValueError):
    """A shard-set directory without a readable, valid manifest."""


def not_a_shard_set(directory: str | os.PathLike) -> str:
    """The one message for a directory without a manifest."""
    return (f"{directory} is not a shard set (no {MANIFEST_NAME}); make one with `python -m shards simulate ...` "
            "or `python -m shards import ...`")


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of the shard set in ``directory``, or :class:`ManifestError` saying why there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(not_a_shard_set(directory))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not a {FORMAT_NAME} manifest")
    if data.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format version {data.get('version')}, this reader knows {FORMAT_VERSION}")
    return Manifest.model_validate(data)


def write_json_atomic(path: Path, payload: dict | list) -> None:
    """Write JSON to ``path`` so that a reader sees either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_manifest(directory: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.model_dump(mode="json"))
