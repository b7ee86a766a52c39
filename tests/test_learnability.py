"""The simulated substructure task can be learned: a small CNN, trained for about a CPU-minute on 2,000
``deeplense2`` images, tells a vortex from no substructure on 400 new ones (and, on 800, CDM subhalos).

This guards the simulator, not the models: if a change to the physics, the noise or the storage made the
classes indistinguishable (as the realistic presets nearly are for a small model), the AUC would fall to
chance and this test would fail. DeepLense's main lens is fixed, so where the light falls in the frame is
information: the small CNN keeps it (no global pooling; flips about the axes keep the lens). The vortex,
1e10 M_sun on a line through the centre on top of the main lens, moves the image by ~8% of its peak; a
globally pooled CNN of the same size stays near chance on it (AUC 0.51 after 150 steps, 0.82 after 450).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shards.simulate import physics as P
from shards.simulate.cli import plan

N_TEST, BATCH = 400, 32
# Training images (no_sub and the other class in turn) and epochs: the vortex needs about 500 steps of 32, CDM
# subhalos (notches of 20-50% of the peak on the arcs) far fewer.
BUDGET = {"vortex": (2000, 8), "cdm": (800, 5)}

pytestmark = pytest.mark.slow  # about a CPU-minute of training by design


def _images(preset: str, count: int, first: int, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images, no_sub and ``positive`` alternately, with labels 0/1."""
    config = plan("substructure", 3 * (first + count), preset=preset, seed=0)
    simulator = P.Simulator(config)
    offset = config.classes.index(positive)
    indices = [3 * (first + k // 2) + (0 if k % 2 == 0 else offset) for k in range(count)]
    images = np.stack([simulator(i)[0] for i in indices])
    labels = np.asarray([config.class_of(i) == positive for i in indices], dtype=np.float32)
    return images, labels


def _small_cnn(size: int = 64, pooled: bool = False) -> nn.Module:
    """Four conv blocks (16-64 channels) and a linear head on the flattened 4x4 map (62k parameters at 64
    px), which keeps where in the frame each feature lies; ``pooled``: global average pooling instead (61k)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    head = (
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1)]
        if pooled
        else [nn.Flatten(), nn.Linear(64 * (size // 16) ** 2, 1)]
    )
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), *block(64, 64), *head)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def _train(model: nn.Module, images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 8) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps = epochs * (len(x) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[start : start + BATCH]
            batch = x[idx]
            # Flips keep the fixed lens's orientation (e1 along x): a label-preserving augmentation.
            if torch.rand(1, generator=gen) < 0.5:
                batch = batch.flip(-1)
            if torch.rand(1, generator=gen) < 0.5:
                batch = batch.flip(-2)
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine more threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("preset, positive", [("deeplense2", "vortex"), ("deeplense2", "cdm")])
def test_small_cnn_separates_substructure_from_none(preset, positive, one_thread):
    torch.manual_seed(0)
    n_train, epochs = BUDGET[positive]
    train_x, train_y = _images(preset, n_train, 0, positive)
    test_x, test_y = _images(preset, N_TEST, n_train, positive)
    # Stored like DeepLense's files: every image peaks at 1, so brightness alone cannot tell the classes.
    assert np.allclose(train_x.max(axis=(1, 2, 3)), 1.0)
    model = _small_cnn(train_x.shape[-1])
    _train(model, train_x, train_y, seed=0, epochs=epochs)
    model.eval()
    with torch.no_grad():
        scores = model(torch.from_numpy(test_x)).squeeze(1).numpy()
    auc = _auc(scores, test_y)
    print(f"{positive} vs no_sub on {preset}: test AUC {auc:.3f}")
    assert auc >= 0.85, (
        f"{positive} vs no_sub test AUC {auc:.3f} on {preset}: the task is no longer learnable"
    )
