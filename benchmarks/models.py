"""The model zoo table: parameters, GFLOPs at 150x150 and CPU train-step time at batch 8.

    .venv/bin/python benchmarks/models.py [--size 150] [--batch 8] [--threads 2] [--models a,b]

GFLOPs count one forward pass of one image (a multiply-add is 2 FLOPs), with
``lenstrain.run.flops.forward_flops_per_sample`` (``torch.utils.flop_counter``), as training counts them. The step time is forward + backward + AdamW step, best of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenstrain.models import create_model, list_models  # noqa: E402
from lenstrain.run.flops import forward_flops_per_sample  # noqa: E402


def gflops(model: torch.nn.Module, size: int) -> float:
    return forward_flops_per_sample(model, (1, size, size)) / 1e9


def step_time(model: torch.nn.Module, size: int, batch: int, repeats: int = 3) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 1, size, size), torch.randn(batch, 1)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first pass is a warm-up
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(list_models()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"| model | params | GFLOPs @{args.size}² | CPU step, batch {args.batch} ({args.threads} threads) |"
    )
    print("|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name, in_channels=1, num_outputs=1, image_size=args.size)
        params = sum(p.numel() for p in model.parameters())
        flops = gflops(model, args.size)
        seconds = step_time(model, args.size, args.batch)
        print(f"| `{name}` | {params / 1e6:.2f} M | {flops:.2f} | {seconds:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
