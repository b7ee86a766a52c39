"""Train-step overhead: lenstrain's step against a bare PyTorch loop, on the same model and batch.

Ours is the body of ``lenstrain.run.train.train_loop`` for one step with its data already in memory:
``backend.accumulating``/``backend.autocast`` around the forward and the loss (``make_loss``),
``backend.backward``, the step's flags (non-finite loss, preemption, checkpoint due) built and
agreed on the device (``backend.reduce_flags``), the previous step's flags read on the host one step
late, ``backend.step`` with its update skippable on the device (unscale, clip, update, zero) and
``scheduler.step()``. The bare loop is ``model(x)``, ``F.mse_loss``, ``zero_grad``, ``backward``,
``clip_grad_norm_`` and ``optimizer.step()``. Both start from identical weights and the same optimizer,
built by ``lenstrain.optimization.optimizers.build_optimizer`` (``--optim``; AdamW, fused, by default): the comparison is of
the step around it.

Blocks of steps alternate between the two (which goes first alternates too). Each side reports its
median ms/step over the blocks, and the overhead is the median of the per-round ratios, with their
interquartile range, so load from other processes on the machine hits both sides alike.

    python benchmarks/step.py                          # alternet_tiny and resnet18 at 64x64, batch 32
    python benchmarks/step.py --models resnet18 --batch 16 --rounds 40
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenstrain.config.schema import OptimConfig, ScheduleConfig  # noqa: E402
from lenstrain.models import create_model  # noqa: E402
from lenstrain.optimization.losses import make_loss  # noqa: E402
from lenstrain.optimization.optimizers import OPTIMIZERS, build_optimizer, build_scheduler  # noqa: E402
from lenstrain.parallel import build_backend  # noqa: E402
from lenstrain.parallel.distributed import DistInfo  # noqa: E402


def make_ours(model, optim: OptimConfig, clip: float, total_steps: int, precision: str):
    optimizer = build_optimizer(optim, model)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=next(model.parameters()).device)
    backend = build_backend("single", model, optimizer, info, precision=precision, grad_clip=clip)
    scheduler = build_scheduler(ScheduleConfig(), optimizer, total_steps)
    return lenstrain_step(backend, make_loss("mse", "regression", 0), scheduler)


def lenstrain_step(backend, loss_fn, scheduler=None, forward=None, channels_last: bool = False):
    """One step of ``lenstrain.run.train``'s loop on micro-batches already at hand (also used by ``gpu.py``):
    forward and backward per micro-batch, the flags agreed on the device, the last step's flags read one
    step late, the skippable update, the schedule."""
    device = backend.info.device
    forward = backend.train_module if forward is None else forward
    pending = []  # the last step's flags, read one step late as the loop does

    def step(micro_batches):
        loss_total = torch.zeros((), device=device)
        for k, batch in enumerate(micro_batches):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["target"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with backend.accumulating(last=k == len(micro_batches) - 1), backend.autocast():
                loss = loss_fn(forward(x), y)
            backend.backward(loss / len(micro_batches))
            loss_total += loss.detach()
        loss = loss_total / len(micro_batches)
        flags = torch.zeros(3, device=device)
        flags[0] = ~torch.isfinite(loss)
        reduced = backend.reduce_flags(flags)
        if pending:
            backend.settle_skip(pending.pop().read()[0])
        backend.step(skip=reduced.on_device[0] > 0)
        pending.append(reduced)
        if scheduler is not None:
            scheduler.step()
        return loss

    return step


def make_bare(model, optim: OptimConfig, clip: float):
    optimizer = build_optimizer(optim, model)

    def step(micro_batches):
        (batch,) = micro_batches
        loss = F.mse_loss(model(batch["image"]).squeeze(-1), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss

    return step


# wall: elapsed time; cpu: this process's CPU time, which other processes on a loaded machine disturb less
# (with one torch thread the step's work runs on the calling thread)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_model(
    name: str,
    optim: OptimConfig,
    size: int,
    batch: int,
    rounds: int,
    steps: int,
    warmup: int,
    clock: str = "wall",
    control: bool = False,
) -> dict:
    torch.manual_seed(0)
    base = create_model(name, in_channels=1, num_outputs=1, image_size=size)
    data = [{"image": torch.randn(batch, 1, size, size), "target": torch.rand(batch)}]
    models = {"bare": copy.deepcopy(base).train(), "lenstrain": copy.deepcopy(base).train()}
    total = warmup + rounds * steps
    runs = {
        "bare": make_bare(models["bare"], optim, 1.0),
        "lenstrain": make_ours(models["lenstrain"], optim, 1.0, total, "fp32"),
    }
    if control:  # a second bare loop on its own copy: its "overhead" is what this machine can resolve
        runs["control"] = make_bare(copy.deepcopy(base).train(), optim, 1.0)
    for fn in runs.values():
        for _ in range(warmup):
            fn(data)
    per_step = {k: [] for k in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in order:
            start = CLOCKS[clock]()
            for _ in range(steps):
                fn = runs[key]
                fn(data)
            per_step[key].append((CLOCKS[clock]() - start) / steps * 1e3)
    bare, ours = statistics.median(per_step["bare"]), statistics.median(per_step["lenstrain"])
    # each round times both sides back to back: the median of the paired ratios cancels slow drifts
    ratios = sorted(o / b for o, b in zip(per_step["lenstrain"], per_step["bare"], strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], 0, ratios[-1]]
    params = sum(p.numel() for p in base.parameters())
    return {
        "model": name,
        "params": params,
        "size": size,
        "batch": batch,
        "bare_ms": bare,
        "ours_ms": ours,
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "overhead_iqr": (100 * (quartiles[0] - 1), 100 * (quartiles[2] - 1)),
        "control_pct": (
            100
            * (
                statistics.median(o / b for o, b in zip(per_step["control"], per_step["bare"], strict=True))
                - 1
            )
            if control
            else None
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["alternet_tiny", "resnet18"])
    parser.add_argument("--optim", choices=list(OPTIMIZERS), default="adamw")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20, help="blocks per side, alternating")
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--control", action="store_true", help="also time a second bare loop (A/A control)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: process CPU time (loaded machines)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s); "
        f"{args.optim}, fp32, batch {args.batch} at 1x{args.size}x{args.size}; median of {args.rounds} blocks of "
        f"{args.steps} steps; {args.clock} clock"
    )
    head = (
        f"{'model':>14} | {'params':>10} | {'bare (ms/step)':>14} | {'lenstrain (ms/step)':>19} | "
        f"{'overhead':>8} | {'overhead IQR':>15}"
    )
    print(head)
    print("-" * len(head))
    for name in args.models:
        r = bench_model(
            name,
            OptimConfig(name=args.optim, lr=1e-3),
            args.size,
            args.batch,
            args.rounds,
            args.steps,
            args.warmup,
            args.clock,
            args.control,
        )
        lo, hi = r["overhead_iqr"]
        print(
            f"{name:>14} | {r['params']:>10,} | {r['bare_ms']:>14.1f} | {r['ours_ms']:>19.1f} | "
            f"{r['overhead_pct']:>+7.1f}% | {lo:>+6.1f}%..{hi:>+5.1f}%"
            + (f" | control {r['control_pct']:+.1f}%" if r["control_pct"] is not None else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
