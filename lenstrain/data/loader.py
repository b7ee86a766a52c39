"""The training data pipeline: a deterministic global order, a resumable cursor, whole-batch workers.

The order of samples is a pure function of (seed, epoch, position): epoch ``e`` visits the train
split in the permutation drawn from ``(seed, e)``. A *global batch* of ``G = batch * world * accum``
samples is cut into per-rank, per-micro-step slices, and the cursor counts samples consumed
globally, never per rank. Hence

- a resume, mid-epoch included, replays exactly the batches the uninterrupted run would have seen;
- every rank takes the same number of steps (the tail that cannot fill a global batch is dropped);
- a resume with another world size continues the same global order from the same sample count.

Samples are read by index: images are copied out of the memory-mapped shards at the member offsets the
manifest records (one copy per sample, no parsing), targets come from the manifest's label table, and
workers (threads or processes, ``data.worker_kind``) build whole batches. Augmentation runs in the worker
or, with ``data.augment.device: device``, on the training process's device, from the same per-sample draws.

A simulated stream (``data.stream``, :mod:`lenstrain.data.stream`) goes through the same stream, cursor and workers
with another order (:class:`SequentialOrder`: epoch ``e`` holds samples ``e * n`` onwards, none twice) and a
builder that renders each sample from its index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from lenstrain.data.augment import Augment
from lenstrain.data.augment import rotation_grid as augment_rotation_grid
from lenstrain.data.batches import Batches, run_batches
from lenstrain.data.normalize import NORMALIZERS
from shards.manifest import Manifest
from shards.mapped import MappedImages
from shards.reader import ShardReader

CURSOR_VERSION = 1
AUGMENT_PLACES = ("cpu", "device")  # where a training batch is augmented: its worker, or its consumer's device


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
        if not isinstance(state, dict) or state.get("version") != CURSOR_VERSION:
            version = state.get("version") if isinstance(state, dict) else state
            raise ValueError(f"data cursor version {version!r} is not {CURSOR_VERSION}")
        fields = set(asdict(self))
        for key, value in state.items():
            if key not in fields or isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data cursor: {key}={value!r} is not a known non-negative integer")
            setattr(self, key, value)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` train samples for one epoch."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


class ShuffledOrder:
    """A shard set's order: epoch ``e`` visits its ``n`` train samples in the permutation of ``(seed, e)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The samples at positions ``start:stop`` of epoch ``epoch``."""
        return epoch_order(self.n, self.seed, epoch)[start:stop]


class SequentialOrder:
    """A stream's order: position ``p`` of epoch ``e`` is sample ``e * n + p``, so no sample index comes twice,
    whatever the epoch, rank or resume."""

    def __init__(self, n: int):
        self.n = n

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        return np.arange(epoch * self.n + start, epoch * self.n + stop, dtype=np.int64)


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

    def encode_values(self, values: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
        """:meth:`encode` over a label-table column (NaN where a sample has no value); ``where(k)`` names the
        sample at position ``k`` in an error."""
        missing = np.flatnonzero(np.isnan(values))
        if len(missing):
            raise ValueError(f"{where(int(missing[0]))}: label {self.name!r} is null or missing")
        if self.kind == "classification":
            return values
        return (values - self.shift) / self.scale

    def decode(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.kind == "classification" else values * self.scale + self.shift


class OptionalLabels:
    """A target coding that reads a missing label as NaN (regression) or -1 (classification), for
    predictions on samples that may lack it."""

    def __init__(self, target: TargetTransform):
        self.target, self.kind, self.name = target, target.kind, target.name

    def encode(self, labels: dict) -> float:
        if labels.get(self.name) is None:
            return math.nan if self.kind == "regression" else -1.0
        return self.target.encode(labels)

    def encode_values(self, values: np.ndarray, where: Callable[[int], str]) -> np.ndarray:  # noqa: ARG002
        missing = np.isnan(values)
        encoded = self.target.encode_values(np.where(missing, 0.0, values), where)
        return np.where(missing, math.nan if self.kind == "regression" else -1.0, encoded)


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor to fill; in a DataLoader worker it lives in shared memory from the start, so
    handing the batch to the training process copies nothing (as default collation does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(shape)


class BatchFinisher:
    """What every batch source shares once a batch's images and targets are in hand: its augmentation (drawn
    per sample from (seed, epoch, index)), its normalisation, and where both run.

    ``normalize`` names an entry of :data:`~lenstrain.data.normalize.NORMALIZERS`; ``mean`` and ``std`` are the
    train split's pixel statistics, which ``global`` and ``asinh`` use. With ``augment_device="device"``, a
    training batch (one with an epoch) leaves the worker as gathered: its consumer moves it to its device and
    calls :meth:`finish` there. Evaluation batches are always finished here.
    """

    def __init__(self, target: TargetTransform, *, seed: int, normalize: str, mean: float, std: float,
                 rotate: bool, flip: bool, augment_device: str = "cpu"):
        if augment_device not in AUGMENT_PLACES:
            raise ValueError(f"augment_device {augment_device!r}; valid: {', '.join(AUGMENT_PLACES)}")
        self.target = target
        self.seed = seed
        self.normalize = normalize
        self.mean, self.std = mean, std or 1.0
        self.augment = Augment(seed, rotate, flip)
        self.defers = augment_device == "device"

    @property
    def rotate(self) -> bool:
        return self.augment.rotate

    @property
    def flip(self) -> bool:
        return self.augment.flip

    def assemble(self, x: torch.Tensor, targets: np.ndarray, indices: np.ndarray,
                 epoch: int | None) -> dict[str, torch.Tensor]:
        """The batch of images ``x`` (gathered, not yet augmented or normalised) and encoded ``targets``."""
        y = torch.from_numpy(targets.astype(np.float32))
        if self.target.kind == "classification":
            y = y.long()
        batch = {"image": x, "target": y, "index": torch.from_numpy(indices)}
        if epoch is None or not self.defers:
            batch["image"] = self.finish(x, indices, epoch)
        elif self.augment.enabled:
            batch["augment"] = self.augment.params(indices, epoch)  # the draws, for the consumer's device
        return batch

    def finish(self, x: torch.Tensor, indices, epoch: int | None, params: torch.Tensor | None = None) -> torch.Tensor:
        """Augment a gathered batch (training batches only: those with an epoch), then normalise it, on ``x``'s
        device. The worker path and the device path call this same function on the same draws (``params``,
        when the worker made them)."""
        if epoch is not None and self.augment.enabled:
            x = self.augment.apply(x, params if params is not None else self.augment.params(indices, epoch))
        return NORMALIZERS[self.normalize](x, self.mean, self.std)


class BatchBuilder(BatchFinisher):
    """Reads and prepares whole batches of a shard set's split; picklable, so worker processes run it.

    The images are copied from the memory-mapped shards (:class:`~shards.mapped.MappedImages`), the targets
    looked up in the manifest's label table (or read from the JSON members of a shard set packed before it
    existed); :class:`BatchFinisher` augments and normalises them.
    """

    def __init__(self, reader: ShardReader, target: TargetTransform, *, seed: int, normalize: str,
                 mean: float, std: float, rotate: bool, flip: bool, augment_device: str = "cpu"):
        super().__init__(target, seed=seed, normalize=normalize, mean=mean, std=std, rotate=rotate, flip=flip,
                         augment_device=augment_device)
        self.reader = reader
        self.images = MappedImages(reader)
        self._columns: dict[str, np.ndarray | None] = {}

    def __call__(self, indices: np.ndarray, epoch: int | None) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        x = batch_buffer((len(indices), *self.images.shape))
        self.images.gather(indices, x.numpy())
        return self.assemble(x, self._targets(indices), indices, epoch)

    def _targets(self, indices: np.ndarray) -> np.ndarray:
        name = self.target.name
        if name not in self._columns:
            self._columns[name] = self.reader.label_column(name)
        column = self._columns[name]
        if column is None:  # no label table: the JSON members
            return np.array([self.target.encode(self.reader.labels(int(i))) for i in indices], dtype=np.float64)
        return self.target.encode_values(column[indices], lambda k: self.reader.where(int(indices[k])))


def rotation_grid(cos: torch.Tensor, sin: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Kept importable from here; see :func:`lenstrain.data.augment.rotation_grid`."""
    return augment_rotation_grid(cos, sin, h, w)


class _PlannedBatches(Dataset):
    """Item ``k`` is the k-th planned micro-batch; a worker builds it whole."""

    def __init__(self, builder: Callable, plan: list[np.ndarray], epoch: int | None):
        self.builder, self.plan, self.epoch = builder, plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        return self.builder(self.plan[k], self.epoch)


class TrainStream:
    """The resumable stream of global batches for one rank.

    ``next_step()`` returns this rank's ``accum`` micro-batches of the next global batch and
    advances the cursor. The cursor is the only state; restoring it restores the stream. With a ``device``,
    the batches are moved there, and a builder that defers augmentation has it done there.

    ``n`` samples make an epoch. ``order`` says which sample sits at each position of an epoch: by default a
    shard set's :class:`ShuffledOrder`; a simulated stream (``data.stream``) passes :class:`SequentialOrder`,
    with a builder that renders each index.
    """

    def __init__(self, builder: BatchFinisher, *, n: int, seed: int, rank: int, world: int, batch: int,
                 accum: int, workers: int, prefetch: int, cursor: Cursor | None = None,
                 worker_kind: str = "process", device: torch.device | str | None = None,
                 order: ShuffledOrder | SequentialOrder | None = None):
        self.builder, self.n, self.seed = builder, n, seed
        self.order = order if order is not None else ShuffledOrder(n, seed)
        self.rank, self.world, self.batch, self.accum = rank, world, batch, accum
        self.workers, self.prefetch, self.worker_kind = workers, prefetch, worker_kind
        if device is None and builder.defers:
            device = "cpu"
        self.device = torch.device(device) if device is not None else None
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
        g = self.global_batch
        stop = offset + max(0, (self.n - offset) // g) * g
        order = self.order.indices(epoch, offset, stop)
        steps = []
        for start in range(0, stop - offset, g):
            block = order[start : start + g]
            steps.append([block[(a * self.world + self.rank) * self.batch : (a * self.world + self.rank + 1) * self.batch]
                          for a in range(self.accum)])
        return steps

    def _open_epoch(self):
        steps = self._plan(self.cursor.epoch, self.cursor.offset)
        flat = [mb for step in steps for mb in step]
        pin = torch.cuda.is_available() and (self.device is None or self.device.type == "cuda")
        batches = run_batches(_PlannedBatches(self.builder, flat, self.cursor.epoch), workers=self.workers,
                              kind=self.worker_kind, prefetch=self.prefetch, pin=pin)
        return batches, len(steps)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._iter is None:
            self._iter, self._left = self._open_epoch()
            if self._left == 0:  # the cursor sat on a dropped tail: start the next epoch
                self.cursor.epoch, self.cursor.offset = self.cursor.epoch + 1, 0
                self._iter, self._left = self._open_epoch()
        micro = [self._place(next(self._iter), self.cursor.epoch) for _ in range(self.accum)]
        self._left -= 1
        self.cursor.offset += self.global_batch
        self.cursor.samples_seen += self.global_batch
        if self._left == 0:
            self.cursor.epoch, self.cursor.offset = self.cursor.epoch + 1, 0
            self._iter = None
        return micro

    def _place(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """The batch on the stream's device (where one is set), augmented and normalised there if deferred."""
        if self.device is None:
            return batch
        batch = dict(batch)
        params = batch.pop("augment", None)
        image = batch["image"].to(self.device, non_blocking=True)
        if self.builder.defers:
            image = self.builder.finish(image, batch["index"], epoch, params)
        return {**batch, "image": image, "target": batch["target"].to(self.device, non_blocking=True)}

    def close(self) -> None:
        self._iter = None


def eval_batches(builder: BatchBuilder, n: int, *, rank: int, world: int, batch: int, workers: int,
                 worker_kind: str = "process") -> Batches:
    """This rank's share of an evaluation split (strided, unaugmented, every sample exactly once)."""
    mine = np.arange(rank, n, world)
    plan = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    return Batches(_PlannedBatches(builder, plan, None), workers=workers, kind=worker_kind)
