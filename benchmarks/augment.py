"""Where augmentation costs what: rotations and flips in the loader workers or in the training process.

Batches of the shard set that ``benchmarks/loader.py`` makes (DeepLense-like 1x150x150 float32), with the
training default of arbitrary-angle rotations and flips, one torch thread. Two measurements, in one run:

1. **One batch, piece by piece** (median of ``--repeats`` x 20 batches): the per-sample draws from
   (seed, epoch, index), which a worker makes in either mode; applying them (a ``torch.where`` flip and one
   batched bilinear ``grid_sample``); the normalisation. With ``data.augment.device: device`` the training
   process pays only "apply" and "normalise", on its device.
2. **The stream** (``TrainStream``, median of ``--repeats`` epochs after one untimed): samples/s, and the
   training process's own CPU time per batch (its main thread, ``time.thread_time``), for augmentation in
   the workers (``cpu``) and in the training process (``device``, here the CPU), with ``--workers``.

    python benchmarks/augment.py --n 2000 --repeats 3
    python benchmarks/augment.py --device cuda     # part 1 on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader import make_data, train_stream  # noqa: E402
from lenstrain.data.augment import Augment  # noqa: E402
from lenstrain.data.normalize import NORMALIZERS  # noqa: E402


def median_ms(fn, repeats: int, device: torch.device, per: int = 20) -> float:
    """Milliseconds per call of ``fn``, the device's queue drained before the clock stops."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(per):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / per)
    return 1e3 * statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pieces(batch: int, size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per batch of each piece of augmentation; the draws on the host, the rest on ``device``."""
    augment = Augment(seed=0, rotate=True, flip=True)
    indices = np.arange(batch) * 37
    x = torch.randn(batch, 1, size, size, device=device)
    params = augment.params(indices, 0)
    cpu = torch.device("cpu")
    return {
        "draws (worker, host)": median_ms(lambda: augment.params(indices, 0), repeats, cpu),
        f"apply: flip + grid_sample ({device.type})": median_ms(
            lambda: augment.apply(x, params), repeats, device
        ),
        f"normalise, global ({device.type})": median_ms(
            lambda: NORMALIZERS["global"](x.clone(), 0.1, 2.0), repeats, device
        ),
    }


def stream_epoch(stream) -> tuple[float, float]:
    """Samples/s and the main thread's CPU milliseconds per batch over one epoch."""
    steps = stream.steps_per_epoch
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        stream.next_step()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return steps * stream.global_batch / wall, 1e3 * cpu / steps


def streams(shards: Path, batch: int, workers: list[int], repeats: int) -> list[dict]:
    configs = [
        (w, kind, place)
        for w in workers
        for kind in (["thread", "process"] if w else ["thread"])
        for place in ("cpu", "device")
    ]
    made = {c: train_stream(shards, batch, c[0], c[1], augment=c[2]) for c in configs}
    for s in made.values():
        stream_epoch(s)
    results: dict = {c: [] for c in configs}
    for r in range(repeats):
        for c in configs if r % 2 == 0 else list(reversed(configs)):
            results[c].append(stream_epoch(made[c]))
    return [
        {
            "workers": c[0],
            "kind": c[1] if c[0] else "-",
            "augment": c[2],
            "samples_s": statistics.median(v[0] for v in results[c]),
            "main_cpu_ms": statistics.median(v[1] for v in results[c]),
        }
        for c in configs
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "lenstrain-bench-loader")
    parser.add_argument("--device", default="cpu", help="where the pieces of part 1 run (e.g. cuda)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _, shards, _ = make_data(args.data, args.n, args.size, 1, 1000)
    print(
        f"batch {args.batch} of 1x{args.size}x{args.size} float32, 1 torch thread; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("\none batch, piece by piece (ms per batch):")
    for name, ms in pieces(args.batch, args.size, args.repeats, torch.device(args.device)).items():
        print(f"  {name:<34} {ms:7.2f}")
    print("\nthe stream (augment cpu = in the workers, device = in the training process, here on the CPU):")
    head = (
        f"{'workers':>7} | {'kind':>7} | {'augment':>7} | {'samples/s':>9} | {'main thread CPU ms/batch':>24}"
    )
    print(head)
    print("-" * len(head))
    for r in streams(shards, args.batch, args.workers, args.repeats):
        print(
            f"{r['workers']:>7} | {r['kind']:>7} | {r['augment']:>7} | {r['samples_s']:>9.0f} | {r['main_cpu_ms']:>24.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
