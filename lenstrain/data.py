"""The training data pipeline: a deterministic global order, a resumable cursor, whole-batch workers.

The order of samples is a pure function of (seed, epoch, position): epoch ``e`` visits the train
split in the permutation drawn from ``(seed, e)``. A *global batch* of ``G = batch * world * accum``
samples is cut into per-rank, per-micro-step slices, and the cursor counts samples consumed
globally, never per rank. Hence

- a resume, mid-epoch included, replays exactly the batches the uninterrupted run would have seen;
- every rank takes the same number of steps (the tail that cannot fill a global batch is dropped);
- a resume with another world size continues the same global order from the same sample count.

Samples are read by index through the member offsets in the manifest (one ``pread`` each), so the
permutation costs nothing in locality, and worker processes build whole batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from shards.manifest import Manifest
from shards.reader import ShardReader

CURSOR_VERSION = 1


@dataclass
class Cursor:
    """Where the global sample stream stands: ``offset`` samples of epoch ``epoch`` are consumed."""

    epoch: int = 0
    offset: int = 0
    global_batch: int = 0
    samples_seen: int = 0
    version: int = CURSOR_VERSION

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CURSOR_VERSION:
            raise ValueError(f"data cursor version {state.get('version')} is not {CURSOR_VERSION}")
        for key, value in state.items():
            setattr(self, key, value)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` train samples for one epoch."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


@dataclass(frozen=True)
class TargetTransform:
    """Maps raw labels to training targets and back (regression scaling from train statistics)."""

    name: str
    kind: str
    scaling: str = "none"
    shift: float = 0.0
    scale: float = 1.0
    classes: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Manifest, name: str | None, scaling: str) -> TargetTransform:
        name = name or manifest.primary_target
        if name not in manifest.targets:
            raise ValueError(f"data.target {name!r} is not in the shard set; it has: {', '.join(manifest.targets)}")
        target = manifest.targets[name]
        if target.kind == "classification":
            return cls(name=name, kind="classification", classes=tuple(target.classes or ()))
        stats = target.stats
        if scaling == "none" or stats is None:
            return cls(name=name, kind="regression")
        if scaling == "standard":
            return cls(name=name, kind="regression", scaling=scaling, shift=stats.mean, scale=stats.std or 1.0)
        return cls(name=name, kind="regression", scaling=scaling, shift=stats.min,
                   scale=(stats.max - stats.min) or 1.0)

    def encode(self, labels: dict) -> float:
        value = labels[self.name]
        if value is None:
            raise ValueError(f"label {self.name!r} is null")
        if self.kind == "classification":
            return float(value)
        return (float(value) - self.shift) / self.scale

    def decode(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.kind == "classification" else values * self.scale + self.shift


class BatchBuilder:
    """Reads and prepares whole batches; picklable, so DataLoader workers run it."""

    def __init__(self, reader: ShardReader, target: TargetTransform, *, seed: int, normalize: bool,
                 mean: float, std: float, rotate: bool, flip: bool):
        self.reader = reader
        self.target = target
        self.seed = seed
        self.normalize = normalize
        self.mean, self.std = mean, std or 1.0
        self.rotate, self.flip = rotate, flip

    def __call__(self, indices: np.ndarray, epoch: int | None) -> dict[str, torch.Tensor]:
        images, targets = [], []
        for i in indices:
            image, labels = self.reader.read(int(i))
            images.append(image)
            targets.append(self.target.encode(labels))
        x = torch.from_numpy(np.stack(images).astype(np.float32, copy=False))
        if epoch is not None and (self.rotate or self.flip):
            x = self._augment(x, indices, epoch)
        if self.normalize:
            x = (x - self.mean) / self.std
        y = torch.tensor(targets, dtype=torch.float32)
        if self.target.kind == "classification":
            y = y.long()
        return {"image": x, "target": y, "index": torch.from_numpy(np.asarray(indices, dtype=np.int64))}

    def _augment(self, x: torch.Tensor, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """Rotate by any angle and flip, each drawn from (seed, epoch, sample): labels are unchanged."""
        n = len(indices)
        angles = np.zeros(n)
        flips = np.zeros(n, dtype=bool)
        for k, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, epoch, int(i), 0xA46])
            angles[k] = rng.uniform(0, 2 * math.pi) if self.rotate else 0.0
            flips[k] = bool(rng.integers(2)) if self.flip else False
        if flips.any():
            x[torch.from_numpy(flips)] = x[torch.from_numpy(flips)].flip(-1)
        if self.rotate:
            cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
            theta = torch.zeros(n, 2, 3)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x


class _PlannedBatches(Dataset):
    """Item ``k`` is the k-th planned micro-batch; a worker builds it whole."""

    def __init__(self, builder: BatchBuilder, plan: list[np.ndarray], epoch: int | None):
        self.builder, self.plan, self.epoch = builder, plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        return self.builder(self.plan[k], self.epoch)


class TrainStream:
    """The resumable stream of global batches for one rank.

    ``next_step()`` returns this rank's ``accum`` micro-batches of the next global batch and
    advances the cursor. The cursor is the only state; restoring it restores the stream.
    """

    def __init__(self, builder: BatchBuilder, *, n: int, seed: int, rank: int, world: int, batch: int,
                 accum: int, workers: int, prefetch: int, cursor: Cursor | None = None):
        self.builder, self.n, self.seed = builder, n, seed
        self.rank, self.world, self.batch, self.accum = rank, world, batch, accum
        self.workers, self.prefetch = workers, prefetch
        self.cursor = cursor or Cursor()
        self.cursor.global_batch = self.global_batch
        if self.global_batch > n:
            raise ValueError(f"a global batch of {self.global_batch} samples exceeds the {n} train samples")
        self._iter = None

    @property
    def global_batch(self) -> int:
        return self.batch * self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _plan(self, epoch: int, offset: int) -> list[list[np.ndarray]]:
        order = epoch_order(self.n, self.seed, epoch)
        steps = []
        g = self.global_batch
        for start in range(offset, self.n - g + 1, g):
            block = order[start : start + g]
            steps.append([block[(a * self.world + self.rank) * self.batch : (a * self.world + self.rank + 1) * self.batch]
                          for a in range(self.accum)])
        return steps

    def _open_epoch(self):
        steps = self._plan(self.cursor.epoch, self.cursor.offset)
        flat = [mb for step in steps for mb in step]
        loader = DataLoader(_PlannedBatches(self.builder, flat, self.cursor.epoch), batch_size=None, shuffle=False,
                            num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        return iter(loader), len(steps)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._iter is None:
            self._iter, self._left = self._open_epoch()
            if self._left == 0:  # the cursor sat on a dropped tail: start the next epoch
                self.cursor.epoch, self.cursor.offset = self.cursor.epoch + 1, 0
                self._iter, self._left = self._open_epoch()
        micro = [next(self._iter) for _ in range(self.accum)]
        self._left -= 1
        self.cursor.offset += self.global_batch
        self.cursor.samples_seen += self.global_batch
        if self._left == 0:
            self.cursor.epoch, self.cursor.offset = self.cursor.epoch + 1, 0
            self._iter = None
        return micro

    def close(self) -> None:
        self._iter = None


def eval_batches(builder: BatchBuilder, n: int, *, rank: int, world: int, batch: int, workers: int):
    """This rank's share of an evaluation split (strided, unaugmented, every sample exactly once)."""
    mine = np.arange(rank, n, world)
    plan = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    return DataLoader(_PlannedBatches(builder, plan, None), batch_size=None, shuffle=False, num_workers=workers)
