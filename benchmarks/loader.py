"""Training-data throughput: lenstrain's shard loader between DeepLense's way of reading and the memory limit.

The same N images (C x S x S float32, 3 classes) exist three times:

- **naive**: DeepLense's layout and reader. One ``.npy`` file per sample in class folders, each an object
  array ``[image, label]`` saved with pickle; a torch ``Dataset`` whose ``__getitem__`` calls
  ``np.load(path, allow_pickle=True)``, batched by ``DataLoader``'s default collation with shuffling.
- **ours**: the shard set that ``shards import deeplense`` makes of that folder, read by
  ``lenstrain.data.loader.TrainStream`` (images copied from the memory-mapped tars, targets from the manifest's
  label table, whole batches per worker; ``--kinds`` picks thread and/or process workers).
- **raw**: the limit. One contiguous float32 file of all images, memory-mapped; each batch is a sorted
  fancy-index gather of a random permutation's next ``batch`` rows (numpy copies the rows into a new
  array): what reading the bytes costs with no format, labels or batching machinery at all.

Same batch size, the same worker count for naive and ours; nothing is augmented or normalised. Each loader
first runs once untimed (which warms the page cache), then the loaders take turns for ``--repeats`` timed
epochs and the median is reported: warm-cache figures, measured side by side in one run.

    python benchmarks/loader.py                   # 8000 samples of 1x150x150, batch 64, workers 0 and 2
    python benchmarks/loader.py --n 2000 --size 64 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenstrain.data.loader import BatchBuilder, TargetTransform, TrainStream  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.options import PackOptions  # noqa: E402
from shards.reader import ShardReader  # noqa: E402
from shards.sources.deeplense import import_deeplense  # noqa: E402

CLASSES = ["axion", "cdm", "no_sub"]
TARGETS = {"naive": 8.0, "raw": 0.40}  # at workers=0: ours >= 8x naive and >= 40% of raw


def synthetic(i: int, size: int, channels: int) -> tuple[np.ndarray, float]:
    """A deterministic image and label value per index (the content does not matter for throughput)."""
    rng = np.random.default_rng(i)
    return rng.standard_normal((channels, size, size), dtype=np.float32), float(rng.uniform(1e-24, 1e-22))


def make_data(root: Path, n: int, size: int, channels: int, shard_size: int) -> tuple[Path, Path, Path]:
    """The DeepLense folder, its shard set and the raw file, made once per (n, size, channels) under ``root``."""
    tag = f"n{n}-s{size}-c{channels}"
    folder, shards, raw = root / f"deeplense-{tag}", root / f"shards-{tag}", root / f"raw-{tag}.npy"
    if not (folder / "done").is_file():
        for c in CLASSES:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, value = synthetic(i, size, channels)
            record = np.empty(2, dtype=object)
            record[0], record[1] = image, value
            np.save(folder / CLASSES[i % 3] / f"{i:06d}.npy", record, allow_pickle=True)
        (folder / "done").write_text("ok")
    if not (shards / "manifest.json").is_file():
        import_deeplense(folder, shards, PackOptions(val=0.0, test=0.0, shard_size=shard_size, overwrite=True))
    if not raw.is_file():
        tmp = raw.with_suffix(".tmp.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, channels, size, size))
        for i in range(n):
            array[i] = synthetic(i, size, channels)[0]
        array.flush()
        del array
        os.replace(tmp, raw)
    return folder, shards, raw


class DeepLenseFolder(Dataset):
    """One pickled ``[image, label]`` file per sample, the class from its folder: DeepLense's way."""

    def __init__(self, root: Path):
        self.items = [(str(p), k) for k, c in enumerate(CLASSES) for p in sorted((root / c).glob("*.npy"))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        image, _value = np.load(path, allow_pickle=True)
        return torch.from_numpy(np.asarray(image, dtype=np.float32)), label


class Naive:
    """DeepLense's loader; one call is one shuffled epoch."""

    def __init__(self, folder: Path, batch: int, workers: int):
        self.loader = DataLoader(DeepLenseFolder(folder), batch_size=batch, shuffle=True, drop_last=True,
                                 num_workers=workers, generator=torch.Generator().manual_seed(0),
                                 prefetch_factor=2 if workers else None)

    def __call__(self) -> tuple[int, float]:
        start, seen = time.perf_counter(), 0
        for x, y in self.loader:
            seen += len(y)
            assert x.dtype == torch.float32
        return seen, time.perf_counter() - start


def train_stream(shards: Path, batch: int, workers: int, kind: str, augment: str | None = None) -> TrainStream:
    """lenstrain's stream of the shard set's train split, unnormalised; ``augment`` (``cpu`` or ``device``)
    adds rotations and flips where it says."""
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest=manifest)
    target = TargetTransform.from_manifest(manifest, "class", "none")
    builder = BatchBuilder(reader, target, seed=0, normalize="none", mean=0.0, std=1.0, rotate=augment is not None,
                           flip=augment is not None, augment_device=augment or "cpu")
    return TrainStream(builder, n=len(reader), seed=0, rank=0, world=1, batch=batch, accum=1, workers=workers,
                       prefetch=2, worker_kind=kind)


class Ours:
    """One stream for the whole run, as in training; one call is one epoch of it."""

    def __init__(self, shards: Path, batch: int, workers: int, kind: str, augment: str | None = None):
        self.stream = train_stream(shards, batch, workers, kind, augment)

    def __call__(self) -> tuple[int, float]:
        start, seen = time.perf_counter(), 0
        for _ in range(self.stream.steps_per_epoch):
            (mb,) = self.stream.next_step()
            seen += len(mb["target"])
            assert mb["image"].dtype == torch.float32
        return seen, time.perf_counter() - start


class Raw:
    """The memory limit: a sorted fancy-index gather of each batch from one contiguous float32 file."""

    def __init__(self, raw: Path, batch: int):
        self.images, self.batch, self.epoch = np.load(raw, mmap_mode="r"), batch, 0

    def __call__(self) -> tuple[int, float]:
        order = np.random.default_rng(self.epoch).permutation(len(self.images))
        self.epoch += 1
        start, seen = time.perf_counter(), 0
        for b in range(0, len(order) - self.batch + 1, self.batch):
            x = torch.from_numpy(self.images[np.sort(order[b : b + self.batch])])
            seen += len(x)
        return seen, time.perf_counter() - start


def measure(runs: dict, repeats: int) -> dict[str, float]:
    """Samples/s of each loader: one untimed run each to warm the page cache, then ``repeats``
    timed runs taking turns (so load from other processes hits all alike); the median is kept."""
    for fn in runs.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for key in list(runs) if r % 2 == 0 else list(reversed(runs)):
            seen, seconds = runs[key]()
            rates[key].append(seen / seconds)
    return {k: statistics.median(v) for k, v in rates.items()}


def print_table(rows: list[dict]) -> None:
    head = (f"{'workers':>7} | {'kind':>7} | {'naive (samples/s)':>17} | {'ours (samples/s)':>16} | "
            f"{'raw gather (samples/s)':>22} | {'ours/naive':>10} | {'ours/raw':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workers']:>7} | {r['kind']:>7} | {r['naive']:>17.0f} | {r['ours']:>16.0f} | {r['raw']:>22.0f} | "
              f"{r['ours'] / r['naive']:>9.1f}x | {r['ours'] / r['raw']:>7.0%}")
    for r in rows:
        if r["workers"] == 0:
            vs_naive, vs_raw = r["ours"] / r["naive"], r["ours"] / r["raw"]
            print(f"targets at workers=0: ours/naive {vs_naive:.1f}x (>= {TARGETS['naive']:.0f}x: "
                  f"{'met' if vs_naive >= TARGETS['naive'] else 'NOT met'}), ours/raw {vs_raw:.0%} "
                  f"(>= {TARGETS['raw']:.0%}: {'met' if vs_raw >= TARGETS['raw'] else 'NOT met'})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--kinds", nargs="+", default=["thread", "process"], choices=["thread", "process"],
                        help="the kinds of our workers timed when workers > 0")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed (warm) runs per loader; the median is shown")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "lenstrain-bench-loader",
                        help="where the three copies of the data are made (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    folder, shards, raw = make_data(args.data, args.n, args.size, args.channels, args.shard_size)
    print(f"{args.n} samples of {args.channels}x{args.size}x{args.size} float32, batch {args.batch}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; median of {args.repeats} warm runs")
    rows = []
    for workers in args.workers:
        kinds = args.kinds if workers else ["-"]
        runs = {"naive": Naive(folder, args.batch, workers), "raw": Raw(raw, args.batch)}
        runs.update({kind: Ours(shards, args.batch, workers, kind if workers else "thread") for kind in kinds})
        rates = measure(runs, args.repeats)
        rows += [{"workers": workers, "kind": kind, "naive": rates["naive"], "ours": rates[kind], "raw": rates["raw"]}
                 for kind in kinds]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
