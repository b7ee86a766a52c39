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

import json
import math
import mmap
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lenstrain.normalize import NORMALIZERS
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


class OptionalLabels:
    """A target coding that reads a missing label as NaN (regression) or -1 (classification), for
    predictions on samples that may lack it."""

    def __init__(self, target: TargetTransform):
        self.target, self.kind, self.name = target, target.kind, target.name

    def encode(self, labels: dict) -> float:
        if labels.get(self.name) is None:
            return math.nan if self.kind == "regression" else -1.0
        return self.target.encode(labels)


class MappedSamples:
    """Copies a sample's array bytes straight into a batch, with no ``.npy`` parsing per sample.

    Each shard is memory-mapped once per process. Every image of a shard set has the manifest's
    shape and dtype, so every ``.npy`` header is the same bytes: the first sample is decoded by
    ``np.load`` (through the reader), its header is kept, and a later sample whose header bytes match
    is the array that follows them. Anything else (another header, a truncated shard) goes through the
    reader, which decodes it or names the damaged member. The values are those ``np.load`` gives.
    """

    def __init__(self, reader: ShardReader):
        image = reader.manifest.image
        self.shape, self.dtype = tuple(image.shape), np.dtype(image.dtype)
        self.count = math.prod(self.shape)
        self.nbytes = self.count * self.dtype.itemsize
        shards = reader.manifest.split(reader.split).shards
        self.paths = [str(reader.directory / shard.name) for shard in shards]
        rows = [(si, m.image_offset, m.image_size, m.json_offset, m.json_size)
                for si, shard in enumerate(shards) for m in shard.members]
        self.table = np.array(rows, dtype=np.int64).reshape(-1, 5)  # one row per sample, in reader order
        self.header: bytes | None = None
        self._maps: dict[int, mmap.mmap] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, shard: int) -> mmap.mmap:
        mm = self._maps.get(shard)
        if mm is None:
            with open(self.paths[shard], "rb") as fh:
                mm = self._maps[shard] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def read_into(self, reader: ShardReader, index: int, out: np.ndarray) -> dict:
        """Write sample ``index``'s image into ``out`` (the manifest's shape) and return its labels."""
        shard, image_offset, image_size, json_offset, json_size = (int(v) for v in self.table[index])
        mm = self._map(shard)
        start = image_offset + image_size - self.nbytes  # where the array follows its header
        if self.header is not None and json_offset + json_size <= len(mm) and \
                mm[image_offset:start] == self.header:
            out[...] = np.frombuffer(mm, self.dtype, self.count, start).reshape(self.shape)
            try:
                return json.loads(mm[json_offset : json_offset + json_size])
            except ValueError:
                pass  # the reader names the member in its error
        image, labels = reader.read(index)
        if image.shape != self.shape:
            raise ValueError(f"{reader.where(index)}: image shape {image.shape} is not the manifest's {self.shape}")
        out[...] = image
        header = mm[image_offset:start] if json_offset + json_size <= len(mm) else b""
        if (self.header is None and image.dtype == self.dtype and image.flags.c_contiguous
                and b"'fortran_order': False" in header):
            self.header = header
        return labels


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor to fill; in a DataLoader worker it lives in shared memory from the start, so
    handing the batch to the training process copies nothing (as default collation does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage).view(shape)


class BatchBuilder:
    """Reads and prepares whole batches; picklable, so DataLoader workers run it.

    ``normalize`` names an entry of :data:`~lenstrain.normalize.NORMALIZERS`; ``mean`` and ``std`` are the
    train split's pixel statistics, which ``global`` and ``asinh`` use.
    """

    def __init__(self, reader: ShardReader, target: TargetTransform, *, seed: int, normalize: str,
                 mean: float, std: float, rotate: bool, flip: bool):
        self.reader = reader
        self.target = target
        self.seed = seed
        self.normalize = normalize
        self.mean, self.std = mean, std or 1.0
        self.rotate, self.flip = rotate, flip
        self.samples = MappedSamples(reader)

    def __call__(self, indices: np.ndarray, epoch: int | None) -> dict[str, torch.Tensor]:
        x = _batch_buffer((len(indices), *self.samples.shape))
        images = x.numpy()
        targets = []
        for k, i in enumerate(indices):
            labels = self.samples.read_into(self.reader, int(i), images[k])
            targets.append(self.target.encode(labels))
        if epoch is not None and (self.rotate or self.flip):
            x = self._augment(x, indices, epoch)
        x = NORMALIZERS[self.normalize](x, self.mean, self.std)
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
            x = F.grid_sample(x, rotation_grid(cos, sin, x.shape[-2], x.shape[-1]), mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        return x


def rotation_grid(cos: torch.Tensor, sin: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid`` for pure rotations (align_corners=False), built by broadcasting: the same
    sampling points to float rounding, at a fraction of the cost of its batched matrix product on CPU."""
    xs = (torch.linspace(-1, 1, w) * (w - 1) / w).view(1, 1, w)
    ys = (torch.linspace(-1, 1, h) * (h - 1) / h).view(1, h, 1)
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    grid = torch.empty(len(cos), h, w, 2)
    torch.sub(c * xs, s * ys, out=grid[..., 0])
    torch.add(s * xs, c * ys, out=grid[..., 1])
    return grid


class _PlannedBatches(Dataset):
    """Item ``k`` is the k-th planned micro-batch; a worker builds it whole."""

    def __init__(self, builder: BatchBuilder, plan: list[np.ndarray], epoch: int | None):
        self.builder, self.plan, self.epoch = builder, plan, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        return self.builder(self.plan[k], self.epoch)


_INLINE_BYTES = 1 << 16


def _pack(batch: dict[str, torch.Tensor]) -> dict:
    """Small tensors (targets, indices) as numpy arrays: they travel from a worker inside the pickle,
    where each tensor would cost a shared-memory segment and a file-descriptor round trip."""
    return {k: v.numpy() if v.numel() * v.element_size() <= _INLINE_BYTES else v for k, v in batch.items()}


def _unpack(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _PackedBatches(_PlannedBatches):
    def __getitem__(self, k: int):
        return _pack(super().__getitem__(k))


def _as_is(item):
    return item


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
        dataset = (_PackedBatches if self.workers else _PlannedBatches)(self.builder, flat, self.cursor.epoch)
        loader = DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_as_is,
                            num_workers=self.workers, prefetch_factor=self.prefetch if self.workers else None,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        return iter(loader), len(steps)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._iter is None:
            self._iter, self._left = self._open_epoch()
            if self._left == 0:  # the cursor sat on a dropped tail: start the next epoch
                self.cursor.epoch, self.cursor.offset = self.cursor.epoch + 1, 0
                self._iter, self._left = self._open_epoch()
        micro = [_unpack(next(self._iter)) for _ in range(self.accum)]
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
