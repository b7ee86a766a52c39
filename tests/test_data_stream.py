"""The data stream: determinism, exact resume, equal batches on uneven shards, elastic world sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenstrain.data import BatchBuilder, Cursor, TargetTransform, TrainStream, epoch_order
from shards.manifest import load_manifest
from shards.reader import ShardReader
from tests.train_helpers import make_ring_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 61 samples in shards of 7: no shard count or split size divides evenly.
    return make_ring_shards(tmp_path_factory.mktemp("d") / "uneven", n=61, shard_size=7, size=16)


def stream(shards, *, rank=0, world=1, batch=3, accum=1, cursor=None, workers=0, augment=True):
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest)
    target = TargetTransform.from_manifest(manifest, None, "standard")
    builder = BatchBuilder(reader, target, seed=5, normalize=True, mean=0.0, std=1.0, rotate=augment, flip=augment)
    return TrainStream(builder, n=len(reader), seed=5, rank=rank, world=world, batch=batch, accum=accum,
                       workers=workers, prefetch=2, cursor=cursor)


def take(s: TrainStream, steps: int) -> list[list[dict]]:
    return [s.next_step() for _ in range(steps)]


def indices(steps) -> list[int]:
    return [int(i) for step in steps for mb in step for i in mb["index"]]


def test_order_is_a_pure_function_of_seed_and_epoch():
    assert np.array_equal(epoch_order(50, 1, 3), epoch_order(50, 1, 3))
    assert not np.array_equal(epoch_order(50, 1, 3), epoch_order(50, 1, 4))
    assert sorted(epoch_order(50, 1, 3)) == list(range(50))


def test_resume_mid_epoch_gives_identical_batches(shards):
    straight = take(stream(shards), 30)  # spans several epochs
    first = stream(shards)
    take(first, 11)
    saved = first.cursor.state_dict()
    cursor = Cursor()
    cursor.load_state_dict(saved)
    rest = take(stream(shards, cursor=cursor, workers=2), 19)  # workers build the same batches
    for a, b in zip(straight[11:], rest, strict=True):
        assert torch.equal(a[0]["index"], b[0]["index"])
        assert torch.equal(a[0]["image"], b[0]["image"])  # augmentation included
        assert torch.equal(a[0]["target"], b[0]["target"])


def test_uneven_shards_give_every_rank_the_same_number_of_batches(shards):
    world, batch = 2, 4
    ranks = [stream(shards, rank=r, world=world, batch=batch) for r in range(world)]
    n = len(ShardReader(shards, "train"))
    assert n % (world * batch) != 0  # the case that hangs naive DDP
    per_epoch = ranks[0].steps_per_epoch
    seen = [indices(take(s, per_epoch)) for s in ranks]
    assert len(seen[0]) == len(seen[1]) == per_epoch * batch
    assert not set(seen[0]) & set(seen[1])  # disjoint slices of one global batch
    assert all(s.cursor.epoch == 1 and s.cursor.offset == 0 for s in ranks)


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_global_order(shards, world_before, world_after):
    batch_before = 4
    g = batch_before * world_before
    before = [stream(shards, rank=r, world=world_before, batch=batch_before) for r in range(world_before)]
    consumed = [i for s in before for i in indices(take(s, 3))]
    cursor = Cursor()
    cursor.load_state_dict(before[0].cursor.state_dict())
    assert cursor.offset == 3 * g
    # keep the global batch: per-rank batch follows the world size
    batch_after = g // world_after
    after = [stream(shards, rank=r, world=world_after, batch=batch_after,
                    cursor=Cursor(**{**cursor.state_dict()})) for r in range(world_after)]
    steps_left = after[0].steps_per_epoch - 3
    continued = [i for s in after for i in indices(take(s, steps_left))]
    order = epoch_order(len(ShardReader(shards, "train")), 5, 0)
    expected = order[: (3 + steps_left) * g]
    assert sorted(consumed + continued) == sorted(expected.tolist())  # nothing skipped
    assert len(set(consumed + continued)) == len(consumed) + len(continued)  # nothing repeated


def test_augmentation_keeps_labels_and_changes_pixels(shards):
    plain = stream(shards, augment=False).next_step()[0]
    augmented = stream(shards, augment=True).next_step()[0]
    assert torch.equal(plain["index"], augmented["index"])
    assert torch.equal(plain["target"], augmented["target"])
    assert not torch.equal(plain["image"], augmented["image"])
    # rotation about the centre roughly preserves total flux of a centred ring
    ratio = augmented["image"].sum(dim=(1, 2, 3)) / plain["image"].sum(dim=(1, 2, 3))
    assert torch.all((ratio > 0.6) & (ratio < 1.4))
