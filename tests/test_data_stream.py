"""The data stream: determinism, exact resume, equal batches on uneven shards, elastic world sizes, and the
pixel normalisations of ``data.normalize``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenstrain.config.schema import load_config
from lenstrain.data.loader import BatchBuilder, Cursor, TargetTransform, TrainStream, epoch_order
from lenstrain.data.normalize import NORMALIZERS
from lenstrain.run.build import build_eval_batches, build_task, local_info
from shards.manifest import load_manifest
from shards.reader import ShardReader
from tests.factories import config_dict, make_ring_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 61 samples in shards of 7: no shard count or split size divides evenly.
    return make_ring_shards(tmp_path_factory.mktemp("d") / "uneven", n=61, shard_size=7, size=16)


def stream(shards, *, rank=0, world=1, batch=3, accum=1, cursor=None, workers=0, augment=True):
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest)
    target = TargetTransform.from_manifest(manifest, None, "standard")
    builder = BatchBuilder(reader, target, seed=5, normalize="global", mean=0.0, std=1.0, rotate=augment, flip=augment)
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


def global_order(ranks: list[TrainStream], steps: int) -> list[int]:
    """The samples of the next ``steps`` global batches, in order: each step's batch of rank 0, then rank 1..."""
    per_rank = [take(s, steps) for s in ranks]
    return [i for step in zip(*per_rank, strict=True) for i in indices(step)]


@pytest.mark.parametrize(("world_before", "world_after"), [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_global_order(shards, world_before, world_after):
    batch_before = 4
    g = batch_before * world_before
    before = [stream(shards, rank=r, world=world_before, batch=batch_before) for r in range(world_before)]
    consumed = global_order(before, 3)
    cursor = Cursor()
    cursor.load_state_dict(before[0].cursor.state_dict())
    assert cursor.offset == 3 * g
    # keep the global batch: per-rank batch follows the world size
    batch_after = g // world_after
    after = [stream(shards, rank=r, world=world_after, batch=batch_after,
                    cursor=Cursor(**{**cursor.state_dict()})) for r in range(world_after)]
    steps_left = after[0].steps_per_epoch - 3
    continued = global_order(after, steps_left)
    order = epoch_order(len(ShardReader(shards, "train")), 5, 0).tolist()
    assert consumed == order[: 3 * g]
    assert continued == order[3 * g : (3 + steps_left) * g]  # on from where it stopped, in the same order


def test_augmentation_keeps_labels_and_changes_pixels(shards):
    plain = stream(shards, augment=False).next_step()[0]
    augmented = stream(shards, augment=True).next_step()[0]
    assert torch.equal(plain["index"], augmented["index"])
    assert torch.equal(plain["target"], augmented["target"])
    assert not torch.equal(plain["image"], augmented["image"])
    # rotation about the centre roughly preserves total flux of a centred ring
    ratio = augmented["image"].sum(dim=(1, 2, 3)) / plain["image"].sum(dim=(1, 2, 3))
    assert torch.all((ratio > 0.6) & (ratio < 1.4))


# ------------------------------------------------------------------------------------ data.normalize

MEAN, STD = 0.3, 2.0  # stand-ins for a manifest's pixel statistics, far from the identity


def normalised(shards, mode: str, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` train images as the batch builder normalises them with ``mode``, and as stored."""
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest)
    target = TargetTransform.from_manifest(manifest, None, "standard")
    builder = BatchBuilder(reader, target, seed=5, normalize=mode, mean=MEAN, std=STD, rotate=False, flip=False)
    raw = np.stack([reader.read(i)[0] for i in range(n)]).astype(np.float32)
    return builder(np.arange(n), None)["image"].numpy(), raw


def test_normalize_global_uses_the_train_split_statistics(shards):
    x, raw = normalised(shards, "global")
    np.testing.assert_allclose(x, (raw - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_normalize_per_image_max_gives_each_image_a_peak_of_one(shards):
    x, raw = normalised(shards, "per_image_max")
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x, raw / raw.max(axis=(1, 2, 3), keepdims=True), rtol=1e-6, atol=1e-7)


def test_normalize_per_image_std_gives_each_image_zero_mean_and_unit_std(shards):
    x, raw = normalised(shards, "per_image_std")
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    expected = (raw - raw.mean(axis=(1, 2, 3), keepdims=True)) / raw.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5)


def test_normalize_asinh_is_asinh_of_the_image_over_the_train_std(shards):
    x, raw = normalised(shards, "asinh")
    np.testing.assert_allclose(x, np.arcsinh(raw / STD), rtol=1e-6, atol=1e-6)


def test_normalize_none_keeps_the_stored_pixels(shards):
    x, raw = normalised(shards, "none")
    assert np.array_equal(x, raw)


def test_every_normalisation_has_a_test():
    untested = [mode for mode in NORMALIZERS if not any(name.startswith(f"test_normalize_{mode}_") for name in globals())]
    assert not untested


def test_old_boolean_normalize_settings_still_load(shards):
    assert load_config(config_dict(shards, data={"normalize": True})).data.normalize == "global"
    assert load_config(config_dict(shards, data={"normalize": False})).data.normalize == "none"
    assert load_config(config_dict(shards)).data.normalize == "global"  # the default
    with pytest.raises(ValueError, match="data.normalize: Input should be 'global', 'per_image_max'"):
        load_config(config_dict(shards, data={"normalize": "per_pixel"}))


def test_eval_batches_normalise_as_the_run_config_says(shards):
    """eval and predict read through these batches, built from the run's config."""
    cfg = load_config(config_dict(shards, data={"normalize": "per_image_max"}))
    batches = list(build_eval_batches(cfg, build_task(cfg), "test", local_info()))
    peaks = torch.cat([b["image"].amax(dim=(1, 2, 3)) for b in batches])
    assert len(peaks) == len(ShardReader(shards, "test")) and torch.allclose(peaks, torch.ones_like(peaks))
