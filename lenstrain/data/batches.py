"""Running a list of planned batches: in the calling thread, in worker threads, or in worker processes.

Item ``k`` of the planned list is built whole by one worker and the batches come back in plan order, so
what a run sees never depends on how many workers built it or of which kind (``data.worker_kind``):

- ``workers=0``: the calling thread builds each batch when it is asked for;
- ``thread``: a pool of threads builds up to ``workers * prefetch`` batches ahead. The copies out of the
  memory-mapped shards and the torch operations release the GIL, and a batch reaches the training loop
  without being copied or passed between processes;
- ``process``: a ``DataLoader`` with worker processes, each batch handed over in shared memory.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

WORKER_KINDS = ("thread", "process")

_INLINE_BYTES = 1 << 16


def _pack(batch: dict[str, torch.Tensor]) -> dict:
    """Small tensors (targets, indices) as numpy arrays: they travel from a worker inside the pickle,
    where each tensor would cost a shared-memory segment and a file-descriptor round trip."""
    return {k: v.numpy() if v.numel() * v.element_size() <= _INLINE_BYTES else v for k, v in batch.items()}


def _unpack(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _Packed(Dataset):
    def __init__(self, planned: Dataset):
        self.planned = planned

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, k: int):
        return _pack(self.planned[k])


def _as_is(item):
    return item


def _pinned(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.pin_memory() for k, v in batch.items()}


def _build(planned: Dataset, k: int, pin: bool) -> dict[str, torch.Tensor]:
    batch = planned[k]
    return _pinned(batch) if pin else batch


def _inline(planned: Dataset, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    for k in range(len(planned)):
        yield _build(planned, k, pin)


def _threaded(planned: Dataset, workers: int, prefetch: int, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    pool = ThreadPoolExecutor(workers, thread_name_prefix="lenstrain-data")
    pending: collections.deque = collections.deque()
    try:
        submitted = 0
        while submitted < min(workers * prefetch, len(planned)):
            pending.append(pool.submit(_build, planned, submitted, pin))
            submitted += 1
        while pending:
            batch = pending.popleft().result()  # a worker's error (a damaged shard) is raised here
            if submitted < len(planned):
                pending.append(pool.submit(_build, planned, submitted, pin))
                submitted += 1
            yield batch
    finally:  # on exhaustion, or when the consumer drops the iterator
        pool.shutdown(wait=True, cancel_futures=True)


def _processes(planned: Dataset, workers: int, prefetch: int, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    loader = DataLoader(
        _Packed(planned),
        batch_size=None,
        shuffle=False,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=prefetch,
        persistent_workers=False,
        pin_memory=pin,
    )
    for batch in loader:
        yield _unpack(batch)


def run_batches(
    planned: Dataset, *, workers: int, kind: str, prefetch: int = 2, pin: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``planned`` in order, built by ``workers`` workers of ``kind`` (inline when 0); ``pin``
    puts them in page-locked memory, for asynchronous copies to a GPU."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"worker kind {kind!r}; valid: {', '.join(WORKER_KINDS)}")
    if workers == 0:
        return _inline(planned, pin)
    if kind == "thread":
        return _threaded(planned, workers, prefetch, pin)
    return _processes(planned, workers, prefetch, pin)


class Batches:
    """A re-iterable :func:`run_batches`, with a length (evaluation passes over a split more than once)."""

    def __init__(self, planned: Dataset, *, workers: int, kind: str, prefetch: int = 2):
        self.planned, self.workers, self.kind, self.prefetch = planned, workers, kind, prefetch

    def __len__(self) -> int:
        return len(self.planned)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return run_batches(self.planned, workers=self.workers, kind=self.kind, prefetch=self.prefetch)
