"""Verification: passes on a good set, and names the shard and member of each kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import MANIFEST_NAME, load_manifest
from shards.options import PackOptions
from shards.sources.arrays import pack_arrays
from shards.verify import verify_shard_set


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = rng.random((60, 1, 16, 16)).astype(np.float32)
    out = tmp_path_factory.mktemp("verify") / "good"
    pack_arrays(images, {"class": np.arange(60) % 3, "y": rng.random(60)}, out,
                PackOptions(shard_size=10, val=0.2, test=0.2), classification=True)
    return out


@pytest.fixture
def damaged(good_set, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(good_set, copy)
    return copy


def _member(directory: Path, shard: int = 1, member: int = 4):
    m = load_manifest(directory)
    s = m.splits["train"].shards[shard]
    return s, s.members[member]


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_good_set_passes(good_set):
    report = verify_shard_set(good_set)
    assert report.ok, report.problems
    assert report.samples == 60
    assert len(report.shards) == len(list(good_set.glob("*.tar")))


def test_truncation_names_shard_and_member(damaged):
    shard, member = _member(damaged)
    path = damaged / shard.name
    with open(path, "r+b") as fh:
        fh.truncate(member.image_offset + 100)
    report = verify_shard_set(damaged)
    assert not report.ok
    text = "\n".join(report.problems)
    assert f"{shard.name}: {member.image_offset + 100} bytes, manifest says {shard.bytes} (truncated)" in text
    assert f"{shard.name}: member {member.key}.image.npy: truncated" in text
    assert all(p.startswith(shard.name) for p in report.problems)


def test_bit_flip_in_pixels_names_shard_and_member(damaged):
    shard, member = _member(damaged, shard=0, member=7)
    _flip(damaged / shard.name, member.image_offset + member.image_size - 3, bit=2)  # a mantissa bit
    report = verify_shard_set(damaged)
    assert report.problems == [
        f"{shard.name}: sha256 differs from the manifest's",
        f"{shard.name}: member {member.key}.image.npy: CRC-32 differs from the manifest's (data corrupted)",
    ]


def test_bit_flip_in_labels_names_the_json_member(damaged):
    shard, member = _member(damaged, shard=2, member=0)
    _flip(damaged / shard.name, member.json_offset + 1)
    problems = verify_shard_set(damaged).problems
    assert f"{shard.name}: member {member.key}.json: CRC-32 differs from the manifest's (data corrupted)" in problems


def test_bit_flip_in_a_tar_header_names_the_member(damaged):
    shard, member = _member(damaged, shard=1, member=3)
    _flip(damaged / shard.name, member.image_offset - 512 + 2)  # inside the member's name field
    problems = verify_shard_set(damaged).problems
    assert any(p.startswith(f"{shard.name}: member {member.key}.image.npy:") for p in problems), problems


def test_nan_written_over_a_pixel_is_caught_without_crcs(damaged):
    """A manifest from before member CRCs still gets value checks."""
    shard, member = _member(damaged, shard=0, member=2)
    path = damaged / shard.name
    data = bytearray(path.read_bytes())
    data[member.image_offset + member.image_size - 4:member.image_offset + member.image_size] = \
        np.float32(np.nan).tobytes()
    path.write_bytes(bytes(data))
    manifest = json.loads((damaged / MANIFEST_NAME).read_text())
    for split in manifest["splits"].values():
        for s in split["shards"]:
            for m in s["members"]:
                m.pop("image_crc32")
                m.pop("json_crc32")
    (damaged / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify_shard_set(damaged).problems
    assert f"{shard.name}: member {member.key}.image.npy: holds NaN or Inf values" in problems


def test_missing_and_stray_shards_and_counts(damaged):
    shard, _ = _member(damaged, shard=0)
    (damaged / shard.name).rename(damaged / "extra-000000.tar")
    problems = verify_shard_set(damaged).problems
    assert f"{shard.name}: missing" in problems
    assert "extra-000000.tar: a tar file the manifest does not list" in problems


def test_tampered_manifest_counts_and_stats(damaged):
    manifest = json.loads((damaged / MANIFEST_NAME).read_text())
    manifest["splits"]["val"]["count"] += 1
    manifest["targets"]["y"]["stats"]["mean"] += 0.01
    manifest["targets"]["class"]["class_counts"]["test"]["0"] += 1
    (damaged / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = "\n".join(verify_shard_set(damaged).problems)
    assert "split val: manifest count 13, its shards hold 12" in problems
    assert "target y: train mean" in problems
    assert "target class, split test: class counts" in problems


def test_tar_listing_must_match_member_order(damaged):
    """Swapping two members' manifest entries is caught by comparing with tarfile's listing."""
    manifest = json.loads((damaged / MANIFEST_NAME).read_text())
    members = manifest["splits"]["train"]["shards"][0]["members"]
    members[0], members[1] = members[1], members[0]
    (damaged / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify_shard_set(damaged).problems
    assert any("train-000000.tar: member" in p and "tar lists" in p for p in problems), problems
