"""Simulation in the loop, measured: the stream against the bare simulator, and training from it against shards.

Everything on the lens-drawn DeepLense Model II rung (``--preset deeplense2 --lens drawn --halo-mass 11.2,12.1``,
64x64, the stream of ``jobs/stream_substructure.yaml``), side by side in one run, the variants taking turns:

1. **Rendering.** ``--images`` images by ``--workers`` processes, either as the bare simulator (a fork pool mapping
   :class:`~shards.simulate.physics.Simulator` over the indices, each image reduced to a number) or as the stream
   (:class:`~lenstrain.data.loader.TrainStream` with :class:`~lenstrain.data.stream.StreamBatchBuilder`: worker processes
   rendering whole batches of 64, flipped and normalised, handed over in shared memory). Both start cold (the
   processes forked after the same warm-up in the parent) and end when the last image is in the parent.
2. **Training.** A model at 64 px (``--models``; ResNet-18 and a tiny one) trained with AdamW, batch 64, from the
   shard set's train split (``--workers`` thread workers, the shards' default kind) and from the stream
   (``--workers`` process workers, the stream's default kind), ``--steps`` steps a turn after an untimed turn;
   each turn first takes, untimed, the batches its workers can have made ahead (workers x prefetch).
3. **Cores per GPU.** The simulator's CPU time per image at 64 px (``deeplense2``, lens drawn) and 150 px
   (``deeplense1``, lens drawn), one process; each model's training FLOPs per image (3x the forward,
   ``lenstrain.run.flops``) at 40% of an H100's dense bf16 peak (989 TFLOP/s): how many cores keep one GPU fed.

    python benchmarks/stream.py                       # about 10 CPU-minutes on a 2-core machine
    python benchmarks/stream.py --skip-training --rounds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("LENSTRAIN_NO_PROGRESS", "1")

from lenstrain.config.schema import StreamConfig  # noqa: E402
from lenstrain.data.loader import BatchBuilder, SequentialOrder, TargetTransform, TrainStream  # noqa: E402
from lenstrain.data.stream import StreamBatchBuilder, stream_plan  # noqa: E402
from lenstrain.models import create_model  # noqa: E402
from lenstrain.run.flops import TRAIN_FLOPS_PER_FORWARD, forward_flops_per_sample  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.reader import ShardReader  # noqa: E402

H100_BF16_TFLOPS = 989.0
MFU = 0.40
RUNG = {"lens": "drawn", "halo_mass": [11.2, 12.1]}
BATCH = 64
TABLE_MODELS = ("resnet18", "alternet_18", "alternet_large")


def plan_of(preset: str, seed: int = 11, size: int | None = None):
    options = {**RUNG, **({"size": size} if size else {})}
    plan, problems = stream_plan(StreamConfig(preset=preset, task="substructure", seed=seed, options=options,
                                              epoch_size=BATCH))
    if problems:
        raise SystemExit(f"bad stream: {problems}")
    return plan


# ------------------------------------------------------------------------------------ 1. rendering

_SIMULATOR = None


def _render(index: int) -> float:
    image, _ = _SIMULATOR(index)
    return float(image[0, 0, 0])


def bare(plan, workers: int, start: int, n: int) -> float:
    """Images/s of a fresh pool of ``workers`` forked processes rendering samples ``start..start+n``."""
    global _SIMULATOR
    from shards.simulate.physics import Simulator

    _SIMULATOR = Simulator(plan.config)
    for k in range(3):  # the warm-up the stream's builder does before its workers fork
        _SIMULATOR(k)
    clock = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_render, range(start, start + n), chunksize=16)
    return n / (time.perf_counter() - clock)


def target_of() -> TargetTransform:
    return TargetTransform(name="substructure", kind="classification", classes=("no_sub", "cdm", "vortex"))


def stream_builder(plan, augment: bool = True) -> StreamBatchBuilder:
    return StreamBatchBuilder(plan, target_of(), dtype="float32", seed=0, normalize="per_image_max", mean=0.0,
                              std=1.0, rotate=False, flip=augment)


def streamed(plan, workers: int, start: int, n: int) -> float:
    """Images/s of a fresh stream (``workers`` processes) delivering samples ``start..start+n`` in batches of 64."""
    builder = stream_builder(plan)
    builder.warm()
    epoch = start // n
    cursor_stream = TrainStream(builder, n=n, seed=0, rank=0, world=1, batch=BATCH, accum=1, workers=workers,
                                prefetch=2, worker_kind="process", order=SequentialOrder(n))
    cursor_stream.cursor.epoch = epoch
    clock = time.perf_counter()
    for _ in range(n // BATCH):
        cursor_stream.next_step()
    rate = n / (time.perf_counter() - clock)
    cursor_stream.close()
    return rate


def rendering(plan, workers: int, n: int, rounds: int) -> dict:
    rates: dict[str, list[float]] = {"bare": [], "stream": []}
    for r in range(rounds):
        start = (r + 1) * n  # other samples each round, the same ones for both
        rates["bare"].append(bare(plan, workers, start, n))
        rates["stream"].append(streamed(plan, workers, start, n))
        print(f"  round {r + 1}: bare {rates['bare'][-1]:.0f} images/s, stream {rates['stream'][-1]:.0f} images/s",
              flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"workers": workers, "images": n, "rounds": rounds, "bare_images_per_s": rates["bare"],
            "stream_images_per_s": rates["stream"], "median_bare": med["bare"], "median_stream": med["stream"],
            "ratio_of_medians": med["stream"] / med["bare"],
            "ratio_per_round": [s / b for s, b in zip(rates["stream"], rates["bare"], strict=True)]}


# ------------------------------------------------------------------------------------ 2. training


def shard_set(path: Path | None, tmp: Path) -> Path:
    if path is not None:
        return path
    from shards.simulate import simulate

    out = tmp / "dl2-drawn"
    simulate("substructure", 1000, out, preset="deeplense2", physics={k: tuple(v) if isinstance(v, list) else v
                                                                      for k, v in RUNG.items()},
             seed=1, workers=1, val=0.1, test=0.1)
    return out


def shard_stream(shards: Path, workers: int) -> TrainStream:
    manifest = load_manifest(shards)
    reader = ShardReader(shards, "train", manifest)
    target = TargetTransform.from_manifest(manifest, "substructure", "none")
    builder = BatchBuilder(reader, target, seed=0, normalize="per_image_max", mean=0.0, std=1.0, rotate=False,
                           flip=True)
    return TrainStream(builder, n=len(reader), seed=0, rank=0, world=1, batch=BATCH, accum=1, workers=workers,
                       prefetch=2, worker_kind="thread")


def sim_stream(plan, workers: int) -> TrainStream:
    builder = stream_builder(plan)
    builder.warm()
    n = 60000
    return TrainStream(builder, n=n, seed=0, rank=0, world=1, batch=BATCH, accum=1, workers=workers, prefetch=2,
                       worker_kind="process", order=SequentialOrder(n))


def training(plan, shards: Path, model_name: str, workers: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=1, num_outputs=3, image_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sources = {"shards": shard_stream(shards, workers), "stream": sim_stream(plan, workers)}
    name_of = {id(source): name for name, source in sources.items()}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sources}  # the training process's CPU per step

    def turn(source: TrainStream) -> float:
        # What the workers made ahead while the other source trained is taken untimed, so that a turn times what
        # its workers deliver while it trains, not a queue they filled during the other source's turn.
        for _ in range(workers * source.prefetch):
            source.next_step()
        clock, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = source.next_step()[0]
            loss = F.cross_entropy(model(batch["image"]), batch["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        cpu_ms[name_of[id(source)]].append((time.process_time() - cpu) / steps * 1e3)
        return steps * BATCH / (time.perf_counter() - clock)

    for source in sources.values():
        turn(source)  # untimed: workers started, first batches in
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(rounds):
        for name, source in sources.items():
            rates[name].append(turn(source))
        print(f"  {model_name} round {r + 1}: shards {rates['shards'][-1]:.1f}, stream {rates['stream'][-1]:.1f} "
              f"samples/s", flush=True)
    for source in sources.values():
        source.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v[1:]) for k, v in cpu_ms.items()}  # the untimed first turn left out
    return {"model": model_name, "main_process_cpu_ms_per_step": cpu, "workers": workers, "steps_per_turn": steps, "rounds": rounds,
            "shards_samples_per_s": rates["shards"], "stream_samples_per_s": rates["stream"],
            "median_shards": med["shards"], "median_stream": med["stream"],
            "ratio_of_medians": med["stream"] / med["shards"],
            "ratio_per_round": [s / b for s, b in zip(rates["stream"], rates["shards"], strict=True)]}


# ------------------------------------------------------------------------------------ 3. cores per GPU


def cpu_ms_per_image(plan, n: int) -> float:
    """One process's CPU time per rendered image (robust to other load on the machine), best of 3 rounds."""
    from shards.simulate.physics import Simulator

    sim = Simulator(plan.config)
    for k in range(3):
        sim(k)
    best = float("inf")
    for r in range(3):
        clock = time.process_time()
        for i in range(1000 + r * n, 1000 + (r + 1) * n):
            sim(i)
        best = min(best, (time.process_time() - clock) / n)
    return best * 1e3


def cores_per_gpu(per_image_ms: dict[int, float]) -> list[dict]:
    rows = []
    for name in TABLE_MODELS:
        for size, ms in per_image_ms.items():
            with torch.device("meta"):
                model = create_model(name, in_channels=1, num_outputs=3, image_size=size)
            forward = forward_flops_per_sample(model, (1, size, size))
            gpu_rate = MFU * H100_BF16_TFLOPS * 1e12 / (TRAIN_FLOPS_PER_FORWARD * forward)
            per_core = 1e3 / ms
            rows.append({"model": name, "size": size, "forward_gflops": forward / 1e9,
                         "gpu_images_per_s": gpu_rate, "sim_images_per_s_per_core": per_core,
                         "cores_per_gpu": gpu_rate / per_core})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="images per rendering turn (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["resnet18", "alternet_tiny"])
    parser.add_argument("--steps", type=int, default=6, help="training steps per turn (default 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process (default 1)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="a lens-drawn deeplense2 shard set (default: simulate 1,000 images)")
    parser.add_argument("--per-core-images", type=int, default=100)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-rendering", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    plan = plan_of("deeplense2")
    load = os.getloadavg()[0]
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}; torch {torch.__version__}, "
          f"{args.threads} torch thread(s)")
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_start": load,
                     "date": time.strftime("%Y-%m-%d"), "rung": RUNG, "preset": "deeplense2"}

    if not args.skip_rendering:
        print(f"1. rendering {args.images} images of 64x64 with {args.workers} worker processes, {args.rounds} rounds")
        results["rendering"] = r = rendering(plan, args.workers, args.images, args.rounds)
        print(f"   bare {r['median_bare']:.0f} images/s, stream {r['median_stream']:.0f} images/s (medians): "
              f"stream/bare {r['ratio_of_medians']:.2f} (per round "
              f"{', '.join(f'{x:.2f}' for x in r['ratio_per_round'])})")

    if not args.skip_training:
        results["training"] = []
        with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
            shards = shard_set(args.shards, Path(tmp))
            for name in args.models:
                print(f"2. training {name} at 64 px, batch {BATCH}, {args.workers} workers: shards (thread) against "
                      f"the stream (process), {args.steps} steps a turn, {args.rounds} rounds")
                t = training(plan, shards, name, args.workers, args.steps, args.rounds)
                results["training"].append(t)
                cpu = t["main_process_cpu_ms_per_step"]
                print(f"   shards {t['median_shards']:.1f}, stream {t['median_stream']:.1f} samples/s (medians): "
                      f"stream/shards {t['ratio_of_medians']:.2f}; the training process's CPU per step: shards "
                      f"{cpu['shards']:.0f} ms, stream {cpu['stream']:.0f} ms")

    print(f"3. simulator CPU time per image, one process, {args.per_core_images} images, best of 3")
    per_image = {64: cpu_ms_per_image(plan, args.per_core_images),
                 150: cpu_ms_per_image(plan_of("deeplense1"), args.per_core_images)}
    results["sim_cpu_ms_per_image"] = per_image
    results["cores_per_gpu"] = rows = cores_per_gpu(per_image)
    print(f"   64 px (deeplense2, lens drawn): {per_image[64]:.2f} ms; 150 px (deeplense1, lens drawn): "
          f"{per_image[150]:.2f} ms")
    print(f"{'model':>15} | {'px':>3} | {'GFLOP fwd':>9} | {'GPU images/s':>12} | {'sim/s per core':>14} | cores per GPU")
    for row in rows:
        print(f"{row['model']:>15} | {row['size']:>3} | {row['forward_gflops']:9.3f} | {row['gpu_images_per_s']:12,.0f} | "
              f"{row['sim_images_per_s_per_core']:14.0f} | {row['cores_per_gpu']:,.0f}")
    results["load_average_end"] = os.getloadavg()[0]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
