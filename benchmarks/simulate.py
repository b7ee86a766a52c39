"""Simulation throughput, and its overhead over calling lenstronomy directly for the same images.

For the same samples (same seed, task and indices) it times, in one process and interleaved round by round:

* ``lenstronomy``: ``ImageModel.image(kwargs_lens, kwargs_source)`` in a tight loop, with the models
  built and the keyword arguments prepared beforehand (the floor: pure lenstronomy rendering);
* ``sample_fn``: the packer's per-sample function (draw the parameters, look up the cached model,
  render, add noise, build the labels);
* ``simulate``: the whole ``simulate(..., workers=1)`` call (split planning, rendering, encoding, tar
  writing, checksums, manifest), per image.

Each round times every variant once; the best round of each is reported (the least disturbed by other
load on the machine), both as CPU time of the process (robust to other load on a shared machine; the
overhead is taken from it) and as wall time, with the median wall time beside it. Optionally a parallel run with ``--workers`` gives the
images/s of the pool. Example::

    python benchmarks/simulate.py --task substructure --instrument model1 --n 90 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("LENSTRAIN_NO_PROGRESS", "1")

from shards.simulate import physics  # noqa: E402
from shards.simulate.cli import plan, simulate  # noqa: E402


class _Clock:
    """Wall and CPU time of this process over a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _time_lenstronomy(prepared) -> _Clock:
    with _Clock() as clock:
        for model, kwargs_lens, kwargs_source in prepared:
            model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source)
    return clock


def _time_sample_fn(sim, indices) -> _Clock:
    with _Clock() as clock:
        for i in indices:
            sim(i)
    return clock


def _time_simulate(args, workers: int) -> _Clock:
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp, _Clock() as clock:
        simulate(args.task, args.n, Path(tmp) / "set", instrument=args.instrument, size=args.size,
                 seed=args.seed, workers=workers, shard_size=args.shard_size)
    return clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="substructure")
    parser.add_argument("--instrument", default="model1")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--n", type=int, default=90, help="images per variant and round (default 90)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="also time a pool of this many workers (0: skip)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args(argv)

    config = plan(args.task, args.n, instrument=args.instrument, size=args.size, seed=args.seed)
    sim = physics.Simulator(config)
    indices = list(range(args.n))
    # The same images, prepared for a direct call: models built and kwargs made outside the timed loop.
    prepared = []
    for i in indices:
        lens_models, kwargs_lens, source_models, kwargs_source = physics.lenstronomy_kwargs(
            physics.draw_params(config, i))
        prepared.append((physics.image_model(config.instrument, lens_models, source_models), kwargs_lens,
                         kwargs_source))
    _time_sample_fn(sim, indices[: min(8, args.n)])  # warm-up (imports, first calls)
    _time_lenstronomy(prepared[: min(8, args.n)])

    clocks: dict[str, list[_Clock]] = {"lenstronomy": [], "sample_fn": [], "simulate": []}
    for _ in range(args.rounds):
        clocks["lenstronomy"].append(_time_lenstronomy(prepared))
        clocks["sample_fn"].append(_time_sample_fn(sim, indices))
        clocks["simulate"].append(_time_simulate(args, workers=1))

    def best(name: str, kind: str) -> float:
        return min(getattr(c, kind) for c in clocks[name]) / args.n

    inst = config.instrument
    print(f"task {args.task}, instrument {inst.name} ({inst.size}x{inst.size} at {inst.pixel_scale}\"/px), "
          f"classes {'/'.join(config.classes)}, n={args.n}, rounds={args.rounds}, one process")
    print(f"{'variant':<12} {'cpu ms/img':>10} {'wall ms/img':>11} {'(median)':>9} {'img/s/core':>11} "
          f"{'overhead cpu':>13} {'overhead wall':>14}")
    results = {"task": args.task, "instrument": inst.name, "size": inst.size, "n": args.n, "rounds": args.rounds}
    for name in clocks:
        cpu, wall = best(name, "cpu"), best(name, "wall")
        median = statistics.median(c.wall for c in clocks[name]) / args.n
        over_cpu = cpu / best("lenstronomy", "cpu") - 1
        over_wall = wall / best("lenstronomy", "wall") - 1
        print(f"{name:<12} {cpu * 1e3:10.2f} {wall * 1e3:11.2f} {median * 1e3:9.2f} {1 / cpu:11.1f} "
              f"{over_cpu:+13.1%} {over_wall:+14.1%}")
        results[name] = {"cpu_ms_per_image": cpu * 1e3, "wall_ms_per_image": wall * 1e3,
                         "wall_ms_per_image_median": median * 1e3, "images_per_s_per_core": 1 / cpu,
                         "overhead_cpu": over_cpu, "overhead_wall": over_wall}
    ratio = best("simulate", "cpu") / best("lenstronomy", "cpu")
    print(f"ratio simulate / lenstronomy (cpu time) = {ratio:.3f}; "
          f"sample_fn / lenstronomy = {best('sample_fn', 'cpu') / best('lenstronomy', 'cpu'):.3f}")
    if args.workers > 1:
        wall = _time_simulate(args, workers=args.workers).wall
        rate = args.n / wall
        print(f"pool of {args.workers} workers: {rate:.1f} images/s ({rate / args.workers:.1f} per worker), "
              f"{wall:.2f} s wall for {args.n} images (includes worker start-up)")
        results["pool"] = {"workers": args.workers, "images_per_s": rate, "wall_s": wall}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
