"""``python -m lenstrain``: train, eval, predict, lr-find."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lenstrain.config import ConfigError, load_config


def _train(args) -> int:
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (Path(config.data.shards) / "manifest.json").is_file():
        print(f"error: data.shards: {config.data.shards} is not a shard set (no manifest.json); "
              f"make one with `python -m shards simulate ...` or `python -m shards import ...`", file=sys.stderr)
        return 2
    from lenstrain.preflight import preflight
    from shards.manifest import load_manifest

    problems = preflight(config, load_manifest(config.data.shards), world_size=max(args.nproc, 1))
    if problems:
        print("error: invalid config:\n" + "\n".join(f"  {path}: {msg}" for path, msg in problems), file=sys.stderr)
        return 2
    if args.nproc > 1:
        from lenstrain.spawn import spawn_local

        forwarded = ["train", str(args.config), "--run-dir", str(args.run_dir)]
        for item in args.set or []:
            forwarded += ["--set", item]
        return spawn_local(forwarded, args.nproc)
    from lenstrain.train import run_training

    return run_training(config, args.run_dir)


def _command(module: str, function: str):
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenstrain", description="Train, evaluate and apply lensing models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a config or job file (resumes from the newest checkpoint)")
    p.add_argument("config", type=Path, help="YAML with the training sections, or a whole job file")
    p.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, TensorBoard events and logs go")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, NCCL on GPUs)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="metrics and plots of a run's model on a split")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                   help="best by checkpoint.best_metric, or the newest complete one (default: best)")
    p.add_argument("--shards", type=Path, help="evaluate on another shard set (default: the run's own)")
    p.add_argument("--tta", type=int, default=None, help="test-time rotation averaging over k 90-degree turns")
    p.set_defaults(func=_command("lenstrain.evaluate", "main_eval"))

    p = sub.add_parser("predict", help="write a CSV of predictions for a shard set")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--shards", type=Path, required=True, help="shard set to predict on")
    p.add_argument("--split", default="test", help="split to predict (default: test)")
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                   help="best by checkpoint.best_metric, or the newest complete one (default: best)")
    p.set_defaults(func=_command("lenstrain.evaluate", "main_predict"))

    p = sub.add_parser("lr-find", help="LR range test: loss against learning rate, and a suggested lr")
    p.add_argument("config", type=Path, help="config or job file, as for train")
    p.add_argument("--out", type=Path, default=Path("runs/lr-find"), help="output directory (default: runs/lr-find)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--min-lr", type=float, default=1e-7, help="first learning rate (default: 1e-7)")
    p.add_argument("--max-lr", type=float, default=1.0, help="last learning rate (default: 1)")
    p.add_argument("--steps", type=int, default=100, help="steps of the exponential ramp (default: 100)")
    p.set_defaults(func=_command("lenstrain.lr_find", "main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from shards.reader import CorruptSampleError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CorruptSampleError as exc:
        print(f"error: damaged shard set: {exc}\n  check it with: python -m shards verify DIR", file=sys.stderr)
        return 1
