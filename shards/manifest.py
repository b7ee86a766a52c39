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
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from shards.atomic import write_json_atomic

FORMAT_NAME = "lenstrain-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_DIM = 1 << 16  # pixels per side or channels: a bound no image of a shard set comes near
MAX_MEMBER_BYTES = 1 << 34  # 16 GiB: no single member of a shard is larger
MAX_IMAGE_VALUES = 1 << 28  # C x H x W: 1 GiB of float32 per image


def _plain_file_name(name: str) -> str:
    """A shard's file name: one path component inside the set (no directory, no ``..``, no hidden file)."""
    if not _PLAIN_NAME.fullmatch(name) or name in (".", "..") or len(name) > 255:
        raise ValueError(f"{name!r} is not a plain file name inside the shard set (letters, digits, '_', '-', "
                         f"'.'; no directory)")
    return name


NonNegative = Annotated[int, Field(ge=0)]
MemberSize = Annotated[int, Field(ge=0, le=MAX_MEMBER_BYTES)]


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
    shape: tuple[Annotated[int, Field(ge=1, le=MAX_DIM)], Annotated[int, Field(ge=1, le=MAX_DIM)],
                 Annotated[int, Field(ge=1, le=MAX_DIM)]]  # (C, H, W)
    dtype: Literal["float16", "float32"]
    stats: Stats | None = None  # pixel statistics over the train split

    @model_validator(mode="after")
    def _size(self) -> ImageInfo:
        c, h, w = self.shape
        if c * h * w > MAX_IMAGE_VALUES:
            raise ValueError(f"shape {self.shape} holds {c * h * w} values; an image holds at most {MAX_IMAGE_VALUES}")
        return self


class Member(_Strict):
    """One sample's position inside its tar: the data offsets and sizes of its two members."""

    key: str
    image_offset: NonNegative
    image_size: MemberSize
    json_offset: NonNegative
    json_size: MemberSize
    # CRC-32 of each member's data, so that verification can name the member a damaged shard lost.
    image_crc32: Annotated[int, Field(ge=0, lt=1 << 32)] | None = None
    json_crc32: Annotated[int, Field(ge=0, lt=1 << 32)] | None = None

    @model_validator(mode="after")
    def _in_order(self) -> Member:
        if self.json_offset < self.image_offset + self.image_size:
            raise ValueError(f"member {self.key!r}: its JSON data (offset {self.json_offset}) begins inside its "
                             f"image data (offset {self.image_offset}, {self.image_size} bytes)")
        return self


class Shard(_Strict):
    name: Annotated[str, AfterValidator(_plain_file_name)]
    count: NonNegative
    bytes: NonNegative
    sha256: str
    members: list[Member]

    @model_validator(mode="after")
    def _members_inside(self) -> Shard:
        """Every member's data lies inside the shard's recorded size."""
        for member in self.members:
            end = member.json_offset + member.json_size
            if end > self.bytes:
                raise ValueError(f"member {member.key!r} ends at byte {end}, past the shard's {self.bytes} bytes")
        return self


class Split(_Strict):
    count: NonNegative = 0
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
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not a {FORMAT_NAME} manifest")
    if data.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format version {data.get('version')!r}, this reader knows {FORMAT_VERSION}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(manifest_problem(path, exc)) from None
    problem = _set_problem(manifest)
    if problem is not None:
        raise ManifestError(f"{path}: {problem}")
    return manifest


def manifest_problem(path: Path, exc: ValidationError) -> str:
    """One line: the manifest, the first field that is wrong and why (and how many others are)."""
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{path}: {field}: {message}{more}"


def _set_problem(manifest: Manifest) -> str | None:
    """What the fields cannot say one by one: the primary target is a target, and no two shards share a file."""
    if manifest.primary_target not in manifest.targets:
        return (f"primary_target: {manifest.primary_target!r} is not among the targets "
                f"({', '.join(manifest.targets) or 'none'})")
    seen: set[str] = set()
    for split_name, split in manifest.splits.items():
        for k, shard in enumerate(split.shards):
            if shard.name in seen:
                return f"splits.{split_name}.shards.{k}.name: {shard.name!r} is listed twice"
            seen.add(shard.name)
    return None


def save_manifest(directory: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.model_dump(mode="json"))
