"""Check a shard set against its manifest, member by member.

For every shard: the file is present, its size and sha256 match, ``tarfile`` lists exactly the members
the manifest records (same names, same order, same data offsets and sizes), and every member decodes at
its recorded offset, matches its CRC-32, and holds an image of the manifest's shape and dtype with finite
values; its labels match the split's label table, where the manifest has one. Counts, class counts and the
train statistics are recomputed and compared.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.labeltable import same_value
from shards.manifest import MANIFEST_NAME, Manifest, Shard, Stats, load_manifest
from shards.moments import Moments
from shards.reader import CorruptSampleError, decode_image, decode_labels

MAX_PROBLEMS_PER_SHARD = 20


@dataclass
class ShardResult:
    split: str
    name: str
    count: int
    bytes: int
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    directory: Path
    manifest: Manifest
    shards: list[ShardResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # every problem, shard ones included

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def samples(self) -> int:
        return sum(s.count for s in self.shards)


def _compare(moments: Moments, stats: Stats | None, what: str) -> list[str]:
    """How the train split's recomputed ``moments`` differ from the manifest's ``stats``."""
    if stats is None:
        return [f"{what}: manifest has no statistics but train holds {moments.n} values"] if moments.n else []
    if moments.n != stats.count:
        return [f"{what}: train holds {moments.n} values, manifest statistics count {stats.count}"]
    got = moments.stats()
    if got is None:
        return []
    scale = max(abs(stats.mean), stats.std, abs(stats.min), abs(stats.max), 1e-300)
    return [f"{what}: train {key} is {getattr(got, key):.8g}, manifest says {getattr(stats, key):.8g}"
            for key in ("mean", "std", "min", "max")
            if not math.isclose(getattr(got, key), getattr(stats, key), rel_tol=1e-6, abs_tol=1e-9 * scale)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tar_listing(path: Path) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of every member ``tarfile`` finds, and the error that stopped it, if any."""
    found: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                found.append((info.name, info.offset_data, info.size))
    except (tarfile.TarError, EOFError, OSError) as exc:
        return found, f"{type(exc).__name__}: {exc}"
    return found, None


class _Checker:
    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = directory
        self.manifest = manifest
        self.pixels = Moments()
        self.targets = {name: Moments() for name, t in manifest.targets.items() if t.kind == "regression"}
        self.class_counts: dict[str, dict[str, dict[str, int]]] = {
            name: {} for name, t in manifest.targets.items() if t.kind == "classification"}
        self.seen = {name: 0 for name in manifest.splits}  # members of each split before the current shard

    def shard(self, split: str, shard: Shard) -> ShardResult:
        result = ShardResult(split=split, name=shard.name, count=len(shard.members), bytes=shard.bytes)
        problems = result.problems
        path = self.directory / shard.name
        if not path.is_file():
            problems.append(f"{shard.name}: missing")
            return result
        try:
            return self._shard_file(split, shard, path, result)
        except OSError as exc:
            problems.append(f"{shard.name}: cannot be read ({exc.strerror or exc})")
            return result

    def _shard_file(self, split: str, shard: Shard, path: Path, result: ShardResult) -> ShardResult:
        problems = result.problems
        if shard.count != len(shard.members):
            problems.append(f"{shard.name}: manifest count {shard.count} but {len(shard.members)} members listed")
        size = path.stat().st_size
        if size != shard.bytes:
            problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}"
                            + (" (truncated)" if size < shard.bytes else ""))
        elif _sha256(path) != shard.sha256:
            problems.append(f"{shard.name}: sha256 differs from the manifest's")
        self._listing(path, shard, problems)
        first, self.seen[split] = self.seen[split], self.seen[split] + len(shard.members)
        with open(path, "rb", buffering=0) as fh:
            for k, member in enumerate(shard.members):
                if member.json_offset + member.json_size > size:
                    self._member(fh.fileno(), size, split, shard.name, member, problems, first + k)
                    if len(shard.members) > k + 1:
                        problems.append(f"{shard.name}: the {len(shard.members) - k - 1} members after "
                                        f"{member.key} lie past the end of the file")
                    break
                if len(problems) >= MAX_PROBLEMS_PER_SHARD:
                    problems.append(f"{shard.name}: stopped after {MAX_PROBLEMS_PER_SHARD} problems")
                    break
                self._member(fh.fileno(), size, split, shard.name, member, problems, first + k)
        return result

    def _listing(self, path: Path, shard: Shard, problems: list[str]) -> None:
        expected = []
        for m in shard.members:
            expected.append((f"{m.key}.image.npy", m.image_offset, m.image_size))
            expected.append((f"{m.key}.json", m.json_offset, m.json_size))
        found, error = _tar_listing(path)
        for want, got in zip(expected, found, strict=False):
            if want != got:
                problems.append(f"{shard.name}: member {want[0]}: tar lists {got[0]!r} at offset {got[1]} "
                                f"({got[2]} bytes), manifest says offset {want[1]} ({want[2]} bytes)")
                return
        if len(found) > len(expected):
            problems.append(f"{shard.name}: tar holds {len(found) - len(expected)} members the manifest does not "
                            f"list (first: {found[len(expected)][0]})")
        elif len(found) < len(expected):
            first = expected[len(found)][0]
            why = error or "the tar ends or its header is damaged there"
            problems.append(f"{shard.name}: member {first}: not in the tar listing ({why})")
        elif error:
            problems.append(f"{shard.name}: tar listing failed after the last member ({error})")

    def _member(self, fd: int, size: int, split: str, shard_name: str, member, problems: list[str],
                position: int) -> None:
        image_where = f"{shard_name}: member {member.key}.image.npy"
        json_where = f"{shard_name}: member {member.key}.json"
        spans = _read_spans(fd, size, member, image_where, json_where)
        if isinstance(spans, str):
            problems.append(spans)
            return
        try:
            image = decode_image(spans[0], image_where)
            labels = decode_labels(spans[1], json_where)
        except CorruptSampleError as exc:
            problems.append(str(exc))
            return
        problem = self._image_problem(image, image_where) or (
            None if isinstance(labels, dict) else f"{json_where}: not a JSON object")
        if problem:
            problems.append(problem)
            return
        self._labels(labels, split, json_where, problems)
        self._table(labels, split, position, json_where, problems)
        if split == "train":
            self.pixels.add(image)

    def _image_problem(self, image: np.ndarray, where: str) -> str | None:
        info = self.manifest.image
        if tuple(image.shape) != tuple(info.shape):
            return f"{where}: shape {tuple(image.shape)}, manifest says {tuple(info.shape)}"
        if image.dtype != np.dtype(info.dtype):
            return f"{where}: dtype {image.dtype}, manifest says {info.dtype}"
        if not np.isfinite(image).all():
            return f"{where}: holds NaN or Inf values"
        return None

    def _labels(self, labels: dict, split: str, where: str, problems: list[str]) -> None:
        primary = self.manifest.primary_target
        if labels.get(primary) is None:
            problems.append(f"{where}: no value for the primary target {primary!r}")
        for name, target in self.manifest.targets.items():
            value = labels.get(name)
            if value is None:
                continue
            if target.kind == "classification":
                classes = target.classes or []
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(classes):
                    problems.append(f"{where}: {name}={value!r} is not a class index below {len(classes)}")
                    continue
                counts = self.class_counts[name].setdefault(split, {})
                counts[classes[value]] = counts.get(classes[value], 0) + 1
            elif not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{where}: {name}={value!r} is not a finite number")
            elif split == "train":
                self.targets[name].add(np.asarray([value]))

    def _table(self, labels: dict, split: str, position: int, where: str, problems: list[str]) -> None:
        """The sample's entries in the split's label table are what its JSON member says."""
        for name, column in (self.manifest.splits[split].labels or {}).items():
            if position < len(column) and not same_value(column[position], labels, name):
                problems.append(f"{where}: {name}={labels.get(name)!r}, but the manifest's label table says "
                                f"{column[position]!r}")

    def totals(self) -> list[str]:
        problems = []
        for split_name, split in self.manifest.splits.items():
            listed = sum(s.count for s in split.shards)
            if listed != split.count:
                problems.append(f"split {split_name}: manifest count {split.count}, its shards hold {listed}")
            for name, column in (split.labels or {}).items():
                if name not in self.manifest.targets:
                    problems.append(f"split {split_name}: the label table has a column for {name!r}, not a target")
                if len(column) != split.count:
                    problems.append(f"split {split_name}: the label table's {name!r} column has {len(column)} "
                                    f"values for {split.count} samples")
        problems += _compare(self.pixels, self.manifest.image.stats, "image pixels")
        for name, moments in self.targets.items():
            problems += _compare(moments, self.manifest.targets[name].stats, f"target {name}")
        for name, seen in self.class_counts.items():
            recorded = self.manifest.targets[name].class_counts
            if recorded is None:
                continue
            for split_name in self.manifest.splits:
                want = {c: n for c, n in recorded.get(split_name, {}).items() if n}
                got = seen.get(split_name, {})
                if want != got:
                    problems.append(f"target {name}, split {split_name}: class counts {got}, manifest says {want}")
        return problems


def verify_shard_set(directory: str | os.PathLike,
                     on_shard: Callable[[ShardResult], None] | None = None) -> VerifyReport:
    """Verify every shard of the set in ``directory``; ``on_shard`` is called after each shard."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    report = VerifyReport(directory=directory, manifest=manifest)
    checker = _Checker(directory, manifest)
    listed = set()
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            listed.add(shard.name)
            result = checker.shard(split_name, shard)
            report.shards.append(result)
            report.problems.extend(result.problems)
            if on_shard is not None:
                on_shard(result)
    stray = sorted(p.name for p in directory.glob("*.tar") if p.name not in listed)
    report.problems.extend(f"{name}: a tar file the manifest does not list" for name in stray)
    if not any(r.problems for r in report.shards):  # statistics are only comparable over intact data
        report.problems.extend(f"{directory / MANIFEST_NAME}: {problem}" for problem in checker.totals())
    return report


def print_verify_summary(report: VerifyReport) -> None:
    """A table of shards, samples, megabytes and bad shards per split, then OK or FAILED."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 120)
    table = Table(title=f"verify {report.directory}")
    for col in ("split", "shards", "samples", "MB", "bad shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split in report.manifest.splits:
        rows = [r for r in report.shards if r.split == split]
        bad = sum(1 for r in rows if r.problems)
        table.add_row(split, str(len(rows)), str(sum(r.count for r in rows)),
                      f"{sum(r.bytes for r in rows) / 1e6:.1f}", str(bad), style="red" if bad else None)
    console.print(table)
    if report.ok:
        console.print(f"OK: {len(report.shards)} shards, {report.samples} samples match the manifest")
    else:
        console.print(f"FAILED: {len(report.problems)} problems")


def _read_spans(fd: int, size: int, member, image_where: str, json_where: str) -> tuple[bytes, bytes] | str:
    """A member's image and JSON bytes, checked against the manifest's sizes and CRC-32s; else the problem."""
    spans = ((image_where, member.image_size, member.image_offset, member.image_crc32),
             (json_where, member.json_size, member.json_offset, member.json_crc32))
    for where, want_size, offset, _ in spans:
        if offset + want_size > size:  # not read: the span lies outside the file
            return f"{where}: truncated (data ends at byte {offset + want_size}, shard has {size})"
    found = []
    for where, want_size, offset, crc in spans:
        data = os.pread(fd, want_size, offset)
        if len(data) != want_size:
            return f"{where}: truncated (data ends at byte {offset + want_size}, shard has {size})"
        if crc is not None and zlib.crc32(data) != crc:
            return f"{where}: CRC-32 differs from the manifest's (data corrupted)"
        found.append(data)
    return found[0], found[1]
