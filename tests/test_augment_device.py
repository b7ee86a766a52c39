"""Augmentation on the training process's device (``data.augment.device``): the workers only gather, the
training process rotates, flips and normalises, with the same per-sample draws, so the images are those of
the worker path and a resumed run is bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenstrain.config.schema import load_config
from lenstrain.data.augment import Augment
from lenstrain.run.build import augment_place
from lenstrain.run.preemption import EXIT_REQUEUE
from tests.factories import assert_same_weights, config_dict, final_weights, make_ring_shards, write_config
from tests.test_data_loader import assert_same_steps, stream
from tests.train_helpers import lenstrain, train_until_signalled


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_ring_shards(tmp_path_factory.mktemp("d") / "uneven", n=61, shard_size=7, size=16)


@pytest.mark.parametrize(
    ("workers", "kind", "accum"), [(0, "thread", 1), (2, "thread", 2), (2, "process", 1)]
)
def test_device_and_worker_augmentation_give_the_same_images(shards, workers, kind, accum):
    on_workers = stream(shards, augment_device="cpu", accum=accum)
    on_device = stream(shards, workers=workers, kind=kind, augment_device="device", accum=accum)
    assert on_device.builder.defers and on_device.device == torch.device("cpu")
    steps = 12 // accum  # past an epoch's end
    assert_same_steps(
        [on_workers.next_step() for _ in range(steps)], [on_device.next_step() for _ in range(steps)]
    )


def test_deferred_batches_leave_the_worker_as_gathered(shards):
    builder = stream(shards, augment_device="device").builder
    raw = builder(np.arange(6), epoch=0)["image"]
    stored = np.stack([builder.reader.read(i)[0] for i in range(6)])
    assert torch.equal(raw, torch.from_numpy(stored))  # not augmented, not normalised
    plain = stream(shards, augment=False, augment_device="cpu").builder
    assert torch.equal(
        builder.finish(raw.clone(), np.arange(6), 0), stream(shards).builder(np.arange(6), 0)["image"]
    )
    # evaluation batches (no epoch) are finished in the worker: normalised, never augmented
    assert torch.equal(builder(np.arange(6), None)["image"], plain(np.arange(6), None)["image"])


def test_the_worker_draws_and_the_training_process_only_applies(shards, monkeypatch):
    deferring = stream(shards, augment_device="device")
    batch = deferring.builder(np.arange(5), epoch=2)
    assert batch["augment"].shape == (3, 5) and batch["augment"].dtype == torch.float32
    monkeypatch.setattr(Augment, "draws", lambda *a: pytest.fail("the training process drew"))
    placed = deferring._place(batch, epoch=2)
    assert "augment" not in placed
    monkeypatch.undo()
    assert torch.equal(placed["image"], stream(shards).builder(np.arange(5), 2)["image"])


def test_draws_depend_only_on_seed_epoch_and_index():
    augment = Augment(seed=3, rotate=True, flip=True)
    angles, flips = augment.draws(np.array([5, 9, 2]), epoch=1)
    for k, i in enumerate([5, 9, 2]):
        alone = augment.draws(np.array([i]), epoch=1)
        assert alone[0][0] == angles[k] and alone[1][0] == flips[k]
    assert not np.array_equal(augment.draws(np.array([5, 9, 2]), epoch=2)[0], angles)


def test_auto_is_the_device_on_a_gpu_and_the_workers_on_a_cpu(shards):
    cfg = load_config(config_dict(shards, data={"augment": {"device": "auto"}}))
    assert augment_place(cfg, torch.device("cpu")) == "cpu"
    assert augment_place(cfg, torch.device("cuda", 0)) == "device"
    cfg = load_config(config_dict(shards, data={"augment": {"device": "device"}}))
    assert augment_place(cfg, torch.device("cpu")) == "device"


@pytest.mark.slow  # three training processes
def test_resume_with_device_augmentation_and_thread_workers_is_bit_identical(tmp_path, ring_shards):
    config = write_config(
        tmp_path / "c.yaml",
        ring_shards,
        train={"max_steps": 8},
        data={"workers": 2, "worker_kind": "thread", "augment": {"device": "device"}},
    )
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, check=True)
    resumed = tmp_path / "resumed"
    code, out = train_until_signalled(config, resumed, at_step=3)
    assert code == EXIT_REQUEUE, out
    second = lenstrain("train", config, "--run-dir", resumed, check=True)
    assert "resumed from" in second.stdout
    assert_same_weights(final_weights(straight), final_weights(resumed))
