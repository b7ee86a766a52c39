"""Training-data throughput: lenstrain's shard loader against a one-`.npy`-file-per-sample loader.

The same N images (C x S x S float32, 3 classes) are written twice: as a shard set
(``shards.pack.pack_shard_set``) and as a folder of ``.npy`` files in class folders, the layout of
DeepLense's datasets. The naive loader is what DeepLense's training code does: a torch ``Dataset``
whose ``__getitem__`` calls ``np.load(path)``, batched by ``DataLoader``'s default collation with
shuffling. Ours is ``lenstrain.data.TrainStream`` (indexed reads from the tars, whole batches built
by the workers). Both produce float32 image batches and labels, with the same batch size and worker
count; neither augments or normalises, unless ``--augment`` adds rows where ours also rotates and
flips (the training default).

Each loader first runs once untimed (which warms the page cache), then the loaders take turns for
``--repeats`` timed epochs and the median is reported: these are warm-cache figures.

    python benchmarks/loader.py                # 4000 samples of 1x150x150, batch 64, workers 0 and 2
    python benchmarks/loader.py --n 1000 --size 64 --augment
"""

from __future__ import annotations

import argparse
import functools
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

from lenstrain.data import BatchBuilder, TargetTransform, TrainStream  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.options import PackOptions  # noqa: E402
from shards.pack import TargetSpec, pack_shard_set  # noqa: E402
from shards.reader import ShardReader  # noqa: E402

CLASSES = ["no_sub", "cdm", "axion"]


class SyntheticSample:
    """A deterministic image and labels per index (the content does not matter for throughput)."""

    def __init__(self, size: int, channels: int):
        self.size, self.channels = size, channels

    def __call__(self, i: int):
        rng = np.random.default_rng(i)
        image = rng.standard_normal((self.channels, self.size, self.size), dtype=np.float32)
        labels = {"substructure": i % 3, "einstein_radius": float(rng.uniform(0.5, 2.0)),
                  "halo_mass": float(rng.uniform(1e11, 1e13))}
        return image, labels


def make_data(root: Path, n: int, size: int, channels: int, shard_size: int) -> tuple[Path, Path]:
    """The shard set and the `.npy` folder, made once per (n, size, channels) under ``root``."""
    tag = f"n{n}-s{size}-c{channels}"
    shards, folder = root / f"shards-{tag}", root / f"npy-{tag}"
    fn = SyntheticSample(size, channels)
    if not (shards / "manifest.json").is_file():
        pack_shard_set(shards, sample_fn=fn, split_of=["train"] * n,
                       targets=[TargetSpec("substructure", "classification", CLASSES),
                                TargetSpec("einstein_radius", "regression")],
                       primary_target="substructure", source={"kind": "benchmark"},
                       options=PackOptions(shard_size=shard_size, overwrite=True))
    if not (folder / "done").is_file():
        for c in CLASSES:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, labels = fn(i)
            np.save(folder / CLASSES[labels["substructure"]] / f"{i:06d}.npy", image)
        (folder / "done").write_text("ok")
    return shards, folder


class NpyFolder(Dataset):
    """One file per sample, the label from its class folder: the DeepLense way."""

    def __init__(self, root: Path):
        self.items = [(str(p), k) for k, c in enumerate(CLASSES) for p in sorted((root / c).glob("*.npy"))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return torch.from_numpy(np.load(path)), label


def run_naive(folder: Path, batch: int, workers: int, epoch: int) -> tuple[int, float]:
    g = torch.Generator().manual_seed(epoch)
    loader = DataLoader(NpyFolder(folder), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        generator=g, prefetch_factor=2 if workers else None)
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        seen += len(y)
        assert x.dtype == torch.float32
    return seen, time.perf_counter() - start


def run_ours(shards: Path, batch: int, workers: int, epoch: int, augment: bool) -> tuple[int, float]:
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest=manifest)
    target = TargetTransform.from_manifest(manifest, "substructure", "none")
    builder = BatchBuilder(reader, target, seed=epoch, normalize="none", mean=0.0, std=1.0,
                           rotate=augment, flip=augment)
    stream = TrainStream(builder, n=len(reader), seed=epoch, rank=0, world=1, batch=batch, accum=1,
                         workers=workers, prefetch=2)
    start, seen = time.perf_counter(), 0
    for _ in range(stream.steps_per_epoch):
        (mb,) = stream.next_step()
        seen += len(mb["target"])
        assert mb["image"].dtype == torch.float32
    stream.close()
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed (warm) runs per loader; the median is shown")
    parser.add_argument("--augment", action="store_true", help="also time ours with rotation and flips")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "lenstrain-bench-loader",
                        help="where the two copies of the data are made (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    shards, folder = make_data(args.data, args.n, args.size, args.channels, args.shard_size)
    print(f"{args.n} samples of {args.channels}x{args.size}x{args.size} float32, batch {args.batch}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; median of {args.repeats} warm runs")
    rows = []
    for workers in args.workers:
        runs = {"naive": functools.partial(run_naive, folder, args.batch, workers, 0),
                "ours": functools.partial(run_ours, shards, args.batch, workers, 0, False)}
        if args.augment:
            runs["ours_augmented"] = functools.partial(run_ours, shards, args.batch, workers, 0, True)
        rates = measure(runs, args.repeats)
        rows.append({"workers": workers, **rates, "ratio": rates["ours"] / rates["naive"]})

    head = f"{'workers':>7} | {'npy folder (samples/s)':>22} | {'lenstrain (samples/s)':>21} | {'ratio':>5}"
    if args.augment:
        head += f" | {'lenstrain +rot/flip':>19}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['workers']:>7} | {r['naive']:>22.0f} | {r['ours']:>21.0f} | {r['ratio']:>4.1f}x"
        if args.augment:
            line += f" | {r['ours_augmented']:>19.0f}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
