"""The fast loader: images copied from memory-mapped shards, targets from the manifest's label table, worker
threads or processes. Every path gives what ``np.load`` and ``json.loads`` give; old shard sets (no label
table) read the same; damaged members are named."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from lenstrain.config.schema import ConfigError, load_config
from lenstrain.data.loader import BatchBuilder, TargetTransform, TrainStream
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.mapped import MappedImages
from shards.options import PackOptions
from shards.pack import TargetSpec, pack_shard_set
from shards.reader import CorruptSampleError, ShardReader
from shards.verify import verify_shard_set
from tests.factories import RingSample, config_dict, make_ring_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_ring_shards(tmp_path_factory.mktemp("d") / "uneven", n=61, shard_size=7, size=16)


def copy_of(shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def builder_for(shards, *, target: str | None = None, augment: bool = False, augment_device: str = "cpu"):
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest)
    return BatchBuilder(
        reader,
        TargetTransform.from_manifest(manifest, target, "standard"),
        seed=5,
        normalize="global",
        mean=0.3,
        std=2.0,
        rotate=augment,
        flip=augment,
        augment_device=augment_device,
    )


def stream(shards, *, workers=0, kind="thread", augment=True, augment_device="cpu", accum=1):
    builder = builder_for(shards, augment=augment, augment_device=augment_device)
    return TrainStream(
        builder,
        n=len(builder.reader),
        seed=5,
        rank=0,
        world=1,
        batch=4,
        accum=accum,
        workers=workers,
        prefetch=2,
        worker_kind=kind,
    )


def assert_same_steps(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for mb_a, mb_b in zip(step_a, step_b, strict=True):
            assert mb_a.keys() == mb_b.keys()
            for key in mb_a:
                assert torch.equal(mb_a[key], mb_b[key]), key


def test_mapped_images_are_what_np_load_gives(shards):
    reader = ShardReader(shards, "train")
    mapped = MappedImages(reader)
    order = np.random.default_rng(0).permutation(len(reader))
    out = np.empty((len(order), *mapped.shape), dtype=np.float32)
    mapped.gather(order, out)
    assert np.array_equal(out, np.stack([reader.read(int(i))[0] for i in order]))
    # every shard was served from its map, as a fixed-stride view
    assert mapped._maps and all(m.ok.all() and m.rows is not None for m in mapped._maps.values())


def test_float16_shards_are_read_exactly(tmp_path):
    out = tmp_path / "f16"
    pack_shard_set(
        out,
        sample_fn=RingSample(16),
        split_of=["train"] * 20,
        targets=[TargetSpec("y", "regression")],
        primary_target="y",
        source={},
        options=PackOptions(shard_size=6, dtype="float16"),
    )
    reader = ShardReader(out, "train")
    batch = builder_for(out)(np.arange(20), None)["image"]
    raw = np.stack([reader.read(i)[0] for i in range(20)]).astype(np.float32)
    assert torch.equal(batch, (torch.from_numpy(raw) - 0.3) / 2.0)


def test_label_table_is_written_at_pack_time_and_matches_the_json_members(shards):
    manifest = load_manifest(shards)
    for name, split in manifest.splits.items():
        reader = ShardReader(shards, name, manifest)
        assert set(split.labels) == {"y", "cls"}
        for i in range(len(reader)):
            labels = reader.labels(i)
            assert split.labels["y"][i] == labels["y"] and split.labels["cls"][i] == labels["cls"]


@pytest.mark.parametrize("target", ["y", "cls"])
def test_targets_come_from_the_table_without_reading_json(shards, target, monkeypatch):
    builder = builder_for(shards, target=target)
    indices = np.random.default_rng(1).permutation(len(builder.reader))[:20]
    expected = [builder.target.encode(builder.reader.labels(int(i))) for i in indices]
    monkeypatch.setattr(ShardReader, "labels", lambda *a: pytest.fail("a JSON member was read"))
    got = builder(indices, None)["target"]
    assert torch.equal(
        got, torch.tensor(expected, dtype=torch.float32).to(got.dtype)
    )  # as the JSON path makes it
    assert got.dtype == (torch.long if target == "cls" else torch.float32)


def strip_label_tables(directory) -> None:
    """Make ``directory`` a shard set as packed before the label table existed."""
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        split.pop("labels")
    path.write_text(json.dumps(manifest))


def test_old_shard_sets_without_a_label_table_give_identical_batches(shards, tmp_path):
    old = copy_of(shards, tmp_path)
    strip_label_tables(old)
    assert load_manifest(old).splits["train"].labels is None
    new_stream, old_stream = stream(shards), stream(old)
    assert_same_steps(
        [new_stream.next_step() for _ in range(12)], [old_stream.next_step() for _ in range(12)]
    )


@pytest.mark.parametrize(("workers", "kind"), [(2, "thread"), (2, "process")])
def test_worker_kinds_give_identical_batches(shards, workers, kind):
    inline = stream(shards)
    expected = [inline.next_step() for _ in range(14)]  # past an epoch's end (14 x 4 > 43)
    workers_stream = stream(shards, workers=workers, kind=kind)
    assert_same_steps(expected, [workers_stream.next_step() for _ in range(14)])


def _member(directory, shard: int, member: int):
    s = load_manifest(directory).splits["train"].shards[shard]
    return s, s.members[member]


def test_a_truncated_shard_names_its_shard_and_member(shards, tmp_path):
    damaged = copy_of(shards, tmp_path)
    shard, member = _member(damaged, 2, 3)
    with open(damaged / shard.name, "r+b") as fh:
        fh.truncate(member.image_offset + 200)
    builder = builder_for(damaged)
    first = 2 * 7  # the shard's first sample
    builder(np.arange(first, first + 3), None)  # the members before the cut still read
    with pytest.raises(CorruptSampleError, match=f"{shard.name}:{member.key}: shard is truncated"):
        builder(np.arange(first, first + 5), None)


def test_a_damaged_npy_header_names_its_member_and_spares_the_others(shards, tmp_path):
    damaged = copy_of(shards, tmp_path)
    shard, member = _member(damaged, 1, 4)
    with open(damaged / shard.name, "r+b") as fh:
        fh.seek(member.image_offset + 1)
        fh.write(b"X")  # the magic string
    builder = builder_for(damaged)
    others = [i for i in range(7, 14) if i != 7 + 4]
    assert torch.equal(
        builder(np.array(others), None)["image"], builder_for(shards)(np.array(others), None)["image"]
    )
    with pytest.raises(CorruptSampleError, match=f"{shard.name}:{member.key}: cannot decode image"):
        builder(np.array([7 + 4]), None)


def test_a_worker_thread_error_reaches_the_training_loop(shards, tmp_path):
    damaged = copy_of(shards, tmp_path)
    for s in load_manifest(damaged).splits["train"].shards:
        with open(damaged / s.name, "r+b") as fh:
            fh.truncate(s.members[0].image_offset + 100)
    with pytest.raises(CorruptSampleError, match="shard is truncated"):
        stream(damaged, workers=2, kind="thread").next_step()


def test_verify_checks_the_label_table(shards, tmp_path):
    edited = copy_of(shards, tmp_path)
    path = edited / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["splits"]["val"]["labels"]["cls"][2] = 1 - manifest["splits"]["val"]["labels"]["cls"][2]
    path.write_text(json.dumps(manifest))
    key = load_manifest(edited).splits["val"].shards[0].members[2].key
    problems = verify_shard_set(edited).problems
    assert any(f"member {key}.json: cls=" in p and "label table says" in p for p in problems), problems
    assert verify_shard_set(shards).ok


def test_the_tars_hold_only_the_two_members_of_each_sample(shards):
    """Any WebDataset reader groups these by key: nothing was added to the tars for the fast path."""
    shard = load_manifest(shards).splits["train"].shards[0]
    with tarfile.open(shards / shard.name) as tar:
        names = tar.getnames()
    assert names == [n for m in shard.members for n in (f"{m.key}.image.npy", f"{m.key}.json")]


def test_worker_kind_and_augment_device_are_validated(shards):
    cfg = load_config(config_dict(shards, data={"augment": {}}))
    assert (cfg.data.worker_kind, cfg.data.augment.device) == ("thread", "auto")
    with pytest.raises(ConfigError, match="data.worker_kind: Input should be 'thread' or 'process'"):
        load_config(config_dict(shards, data={"worker_kind": "fiber"}))
    with pytest.raises(ConfigError, match="data.augment.device: Input should be 'auto', 'cpu' or 'device'"):
        load_config(config_dict(shards, data={"augment": {"device": "gpu"}}))
