"""Training throughput and model FLOP utilisation (MFU) of a registry model on one device.

Synthetic batches already on the device; the step is forward under autocast (bf16 by default),
loss, backward, AdamW. FLOPs per step are counted once with ``torch.utils.flop_counter``
(forward + backward of one step; matrix products and convolutions, as MFU conventionally counts),
and MFU is achieved FLOP/s over the device's dense peak for the precision (``--peak-tflops``, else a
table for common GPUs). The optimizer step is timed but not counted.

    python benchmarks/gpu.py --model alternet_18 --size 150 --batch 128               # on a GPU
    python benchmarks/gpu.py --model resnet50 --batch 256 --channels-last --compile
    python benchmarks/gpu.py --model alternet_tiny --size 32 --batch 4 --steps 3     # CPU smoke check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenstrain.models import create_model  # noqa: E402

# Dense (no sparsity) peak TFLOP/s by precision, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 80GB HBM3": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return table[precision] or None
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="alternet_18")
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for --precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model = create_model(args.model, in_channels=args.channels, num_outputs=args.outputs,
                         image_size=args.size).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randn(args.batch, args.outputs, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(forward(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:  # counted on the eager model: the FLOPs of the maths, whatever compiles them
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps

    params = sum(p.numel() for p in model.parameters())
    achieved = flops_per_step / seconds / 1e12
    peak = args.peak_tflops or peak_tflops(device, args.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: {args.model} ({params / 1e6:.1f}M params), {args.channels}x{args.size}x{args.size}, "
          f"batch {args.batch}, {args.precision}, channels_last={args.channels_last}, compile={args.compile}")
    rows = [("ms/step", f"{seconds * 1e3:.1f}"), ("samples/s", f"{args.batch / seconds:.0f}"),
            ("GFLOP/step (fwd+bwd)", f"{flops_per_step / 1e9:.4g}"), ("achieved TFLOP/s", f"{achieved:.4g}"),
            ("MFU", f"{100 * achieved / peak:.1f}% of {peak:g} TFLOP/s" if peak else "n/a (pass --peak-tflops)")]
    if device.type == "cuda":
        rows.append(("peak memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"))
    for key, value in rows:
        print(f"  {key:>22}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
