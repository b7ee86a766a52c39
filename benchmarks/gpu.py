"""Training throughput, TFLOP/s, MFU and peak memory of the flagship models on the GPUs at hand, in one command.

Each configuration runs lenstrain's own step (``benchmarks/step.py``'s ``lenstrain_step``: the backend's
autocast, backward, device-side flags and skippable update) on synthetic batches already on the GPU, in
fresh processes, one per GPU (``--nproc``, all visible GPUs by default), for ``--steps`` timed steps after
``--warmup`` (which include ``torch.compile``'s compilation). The default matrix:

- ``alternet_large`` and ``resnet50`` at 1x150x150, channels_last, AdamW (fused); under ZeRO-2 the inputs
  only are channels_last (DeepSpeed broadcasts weights as byte views, which needs them contiguous), which
  the convolutions propagate to their outputs;
- under ``ddp`` (lenstrain's DDP backend; on one GPU there is nothing to all-reduce and it is the plain
  step) and ``deepspeed`` ZeRO-2;
- bf16 eager and bf16 ``torch.compile``d; and ``alternet_large`` in fp32 eager under DDP (TF32 off), the
  baseline of the bf16 target (at least 1.5x).

FLOPs per sample come from ``lenstrain.run.flops`` (``torch.utils.flop_counter``, forward x3 to train) and the
peaks from its ``PEAKS`` table (``--peak-tflops`` overrides), exactly as training logs ``perf/tflops`` and
``perf/mfu``. The table is printed and appended to ``benchmarks/RESULTS.md`` with the device and the date.

    python benchmarks/gpu.py                                  # on a GPU node: the whole matrix (est. 10-15 min)
    python benchmarks/gpu.py --models resnet50 --modes bf16-compiled --steps 100
    python benchmarks/gpu.py --cpu-smoke --results /tmp/r.md  # 2 tiny steps per configuration on CPU

Without a GPU it stops with a clear error (exit 2) unless ``--cpu-smoke``, which runs the same code path
(processes, backends, compile, FLOPs, table, RESULTS.md) with ``alternet_tiny`` at 32x32 on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MARKER = "<!-- benchmarks/gpu.py appends its runs above this line -->"
MODES = {  # name -> (precision, compiled)
    "bf16-eager": ("bf16", False),
    "bf16-compiled": ("bf16", True),
    "fp32-eager": ("fp32", False),
}
BACKENDS = ("ddp", "deepspeed")


@dataclass
class Config:
    model: str
    strategy: str  # ddp or deepspeed (ZeRO-2)
    mode: str  # a key of MODES
    size: int
    batch: int  # per GPU
    steps: int
    warmup: int
    channels_last: bool = True
    peak_tflops: float | None = None
    compile_backend: str = "inductor"

    @property
    def label(self) -> str:
        strategy = "zero2" if self.strategy == "deepspeed" else self.strategy
        return f"{self.model} {strategy} {self.mode}"


def matrix(args) -> list[Config]:
    """The configurations to run: every model x backend x mode asked for, and the fp32 baseline of the first model."""
    base = {"size": args.size, "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops}
    base["compile_backend"] = args.compile_backend
    configs = [
        Config(model, strategy, mode, batch=args.batch.get(model, args.default_batch), **base)
        for model in args.models
        for strategy in args.backends
        for mode in args.modes
    ]
    if args.baseline and "fp32-eager" not in args.modes:
        model = args.models[0]
        configs.append(
            Config(model, "ddp", "fp32-eager", batch=args.batch.get(model, args.default_batch), **base)
        )
    return configs


# ------------------------------------------------------------------------------------ one configuration, per rank


def run_worker(config: Config, out: Path) -> None:
    """One rank of one configuration (RANK/WORLD_SIZE/... in the environment); rank 0 writes the result to ``out``."""
    from benchmarks.step import lenstrain_step
    from lenstrain.config.schema import OptimConfig
    from lenstrain.models import create_model
    from lenstrain.optimization.losses import make_loss
    from lenstrain.optimization.optimizers import build_optimizer
    from lenstrain.parallel import build_backend
    from lenstrain.parallel.distributed import init_distributed, shutdown_distributed
    from lenstrain.run.flops import flop_rate

    precision, compiled = MODES[config.mode]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 is fp32
    torch.backends.cudnn.benchmark = True
    info = init_distributed("auto", timeout_s=600)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = create_model(config.model, in_channels=1, num_outputs=1, image_size=config.size).to(
            info.device
        )
        if config.channels_last and config.strategy != "deepspeed":  # DeepSpeed needs contiguous weights
            model = model.to(memory_format=torch.channels_last)
        shape = (1, config.size, config.size)
        rate = flop_rate(model, shape, info.device, precision, info.world_size, config.peak_tflops)
        optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-4), model)
        options = {"zero_stage": 2} if config.strategy == "deepspeed" else {}
        backend = build_backend(
            config.strategy, model, optimizer, info, precision=precision, grad_clip=1.0, **options
        )
        forward = backend.compiled_forward(config.compile_backend) if compiled else backend.train_module
        step = lenstrain_step(backend, make_loss("mse", "regression", 0), None, forward, config.channels_last)
        batch = [
            {
                "image": torch.randn(config.batch, *shape, device=info.device),
                "target": torch.randn(config.batch, device=info.device),
            }
        ]
        result = timed(step, batch, config, info)
        perf = rate.scalars(result["images_per_s"])
        result.update(tflops=perf["perf/tflops"], mfu=perf.get("perf/mfu"), peak_tflops=rate.peak_tflops)
        result.update(params=sum(p.numel() for p in model.parameters()), world_size=info.world_size)
        result["gflop_per_image"] = rate.train_flops_per_sample / 1e9
        if info.is_main:
            out.write_text(json.dumps(result))
    finally:
        shutdown_distributed()


def timed(step, batch, config: Config, info) -> dict:
    """Warm up (compiling), then time ``config.steps`` steps; images/s of all ranks and this rank's peak memory."""
    for _ in range(config.warmup):
        step(batch)
    synchronize(info.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    start = time.perf_counter()
    for _ in range(config.steps):
        loss = step(batch)
    synchronize(info.device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{config.label}: the loss is not finite ({float(loss)})")
    memory = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
    return {
        "ms_per_step": 1e3 * seconds / config.steps,
        "images_per_s": config.batch * info.world_size * config.steps / seconds,
        "peak_memory_gib": memory,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ the driver


def run_config(config: Config, nproc: int, timeout: float) -> dict:
    """``config`` on ``nproc`` fresh processes (one per GPU); its result, or ``{"error": ...}``."""
    from lenstrain.parallel.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {
            **os.environ,
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            json.dumps(asdict(config)),
            "--out",
            str(out),
        ]
        procs = [
            subprocess.Popen(
                cmd,
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(nproc)
        ]
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                return {"error": f"timed out after {timeout:.0f} s"}
        if any(p.returncode for p in procs) or not out.is_file():
            tail = "\n".join(logs[0].strip().splitlines()[-15:])
            return {"error": f"exit {[p.returncode for p in procs]}:\n{tail}"}
        return json.loads(out.read_text())


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[tuple[Config, dict]]) -> list[str]:
    """A markdown table of the results, with each configuration's speed-up over the fp32 eager baseline."""
    baseline = {c.model: r["images_per_s"] for c, r in rows if c.mode == "fp32-eager" and "error" not in r}
    lines = [
        "| model | backend | mode | GPUs x batch | ms/step | images/s | TFLOP/s per GPU | MFU | peak memory | vs fp32 eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in rows:
        backend = "ZeRO-2" if c.strategy == "deepspeed" else "DDP"
        head = f"| `{c.model}` | {backend} | {c.mode} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'].splitlines()[0]} | | | | | | |")
            continue
        speedup = r["images_per_s"] / baseline[c.model] if c.model in baseline else None
        memory = "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
        lines.append(
            f"{head} {r['world_size']} x {c.batch} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['tflops']:.4g} | {fmt(r['mfu'], '.1%')} | {memory} | {fmt(speedup, '.2f')} |"
        )
    return lines


def device_line(nproc: int, smoke: bool) -> str:
    if smoke or not torch.cuda.is_available():
        return f"CPU ({platform.machine()}, {os.cpu_count()} cores), {nproc} process(es)"
    return f"{nproc} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def append_results(path: Path, text: str) -> None:
    """Insert ``text`` above ``MARKER`` in ``path`` (at the end when there is none)."""
    current = path.read_text() if path.is_file() else ""
    if MARKER in current:
        updated = current.replace(MARKER, text.rstrip() + "\n\n" + MARKER, 1)
    else:
        updated = current.rstrip() + ("\n\n" if current else "") + text.rstrip() + "\n"
    path.write_text(updated)


def parse_batches(values: list[str]) -> dict[str, int]:
    out = {}
    for item in values:
        name, sep, number = item.partition("=")
        if not sep or not number.isdigit():
            raise argparse.ArgumentTypeError(f"--batch takes MODEL=N, got {item!r}")
        out[name] = int(number)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["alternet_large", "resnet50"])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["bf16-eager", "bf16-compiled"])
    p.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the fp32 eager baseline"
    )
    p.add_argument(
        "--batch", nargs="*", default=["alternet_large=64", "resnet50=256"], help="per GPU: MODEL=N"
    )
    p.add_argument("--default-batch", type=int, default=64)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--steps", type=int, default=200, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation included)")
    p.add_argument("--nproc", type=int, help="processes, one per GPU (default: every visible GPU)")
    p.add_argument(
        "--peak-tflops", type=float, help="the device's dense peak (default: lenstrain.run.flops.PEAKS)"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument(
        "--results", type=Path, help=f"append the table here (default: {RESULTS.relative_to(ROOT)})"
    )
    p.add_argument("--no-results", action="store_true", help="print only")
    p.add_argument(
        "--cpu-smoke",
        "--dry-run",
        dest="cpu_smoke",
        action="store_true",
        help="2 tiny steps per configuration on CPU (alternet_tiny, 32x32): checks the script end to end",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


def smoke_settings(args) -> None:
    """--cpu-smoke: the whole path, sized for a CPU (and the eager compile backend: no C++ compiler run)."""
    args.models, args.size, args.steps, args.warmup = ["alternet_tiny"], 32, 2, 1
    args.batch, args.default_batch, args.nproc = {}, 2, args.nproc or 1
    if args.compile_backend == "inductor":
        args.compile_backend = "eager"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children on CPU even where a GPU is present
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        run_worker(Config(**json.loads(args.worker)), args.out)
        return 0
    args.batch = parse_batches(args.batch)
    if args.cpu_smoke:
        smoke_settings(args)
    elif not torch.cuda.is_available():
        print(
            "error: benchmarks/gpu.py measures GPUs, and torch sees none here (torch.cuda.is_available() is "
            "False); run it on a GPU node, or check the script on CPU with --cpu-smoke",
            file=sys.stderr,
        )
        return 2
    nproc = args.nproc or torch.cuda.device_count()
    configs = matrix(args)
    device = device_line(nproc, args.cpu_smoke)
    print(
        f"{device}; {len(configs)} configurations, {args.steps} timed steps each after {args.warmup}",
        flush=True,
    )
    rows = []
    for config in configs:
        result = run_config(config, nproc, args.timeout)
        rows.append((config, result))
        summary = (
            result.get("error", "").splitlines()[0]
            if "error" in result
            else (
                f"{result['images_per_s']:.1f} images/s, {result['tflops']:.4g} TFLOP/s, MFU {fmt(result['mfu'], '.1%')}"
            )
        )
        print(f"  {config.label}: {summary}", flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr)
    lines = table(rows)
    print("\n".join(lines))
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date = datetime.date.today().isoformat()
    block = [f"### {date}: {device}", "", "```", command.strip(), "```", "", *lines]
    target = None if args.no_results else args.results or (None if args.cpu_smoke else RESULTS)
    if target is not None:
        append_results(target, "\n".join(block))
        print(f"appended to {target}")
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
