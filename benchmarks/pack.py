"""Packing throughput: an in-memory array set packed into shards with different numbers of workers.

    python benchmarks/pack.py --n 20000 --size 150 --workers 1 2

Prints samples/s and MB/s (shard bytes written per second, fsync included) for each worker count, and
checks that every run wrote byte-identical shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.options import PackOptions  # noqa: E402
from shards.sources.arrays import pack_arrays  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=20_000, help="samples (default 20000)")
    parser.add_argument("--size", type=positive_int, default=150, help="image side in pixels (default 150)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="shard dtype")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2], help="worker counts to run")
    parser.add_argument("--shard-size", type=positive_int, default=1000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the shard sets")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    os.environ.setdefault("LENSTRAIN_NO_PROGRESS", "1")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    images = rng.random((args.n, args.channels, args.size, args.size), dtype=np.float32)
    labels = {"y": rng.random(args.n)}
    source_mb = images.nbytes / 1e6
    print(f"source: {args.n} x {tuple(images.shape[1:])} float32 in memory ({source_mb:.0f} MB, "
          f"made in {time.perf_counter() - t0:.1f} s); shards: {args.dtype}, {args.shard_size} per shard")
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}")

    base = args.dir or Path(tempfile.mkdtemp(prefix="lenstrain-pack-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    digests = []
    try:
        for workers in args.workers:
            out = base / f"workers-{workers}"
            t0 = time.perf_counter()
            result = pack_arrays(images, labels, out, PackOptions(workers=workers, shard_size=args.shard_size,
                                                                 dtype=args.dtype, overwrite=True))
            seconds = time.perf_counter() - t0
            shards = [s for split in result.manifest.splits.values() for s in split.shards]
            written = sum(s.bytes for s in shards)
            digests.append([s.sha256 for s in shards])
            row = {"workers": workers, "samples": args.n, "seconds": round(seconds, 3),
                   "samples_per_s": round(args.n / seconds, 1), "mb_per_s": round(written / 1e6 / seconds, 1),
                   "shard_mb": round(written / 1e6, 1), "shards": len(shards)}
            results.append(row)
            print(f"workers={workers}: {seconds:7.2f} s  {row['samples_per_s']:8.1f} samples/s  "
                  f"{row['mb_per_s']:7.1f} MB/s  ({len(shards)} shards, {row['shard_mb']:.0f} MB)", flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    identical = all(d == digests[0] for d in digests)
    print(f"byte-identical shards across worker counts: {'yes' if identical else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "identical": identical}, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
