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
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--shards", type=Path, help="evaluate on another shard set")
    p.add_argument("--tta", type=int, default=None, help="test-time rotation averaging over k 90-degree turns")
    p.set_defaults(func=_command("lenstrain.evaluate", "main_eval"))

    p = sub.add_parser("predict", help="write a CSV of predictions for a shard set")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.set_defaults(func=_command("lenstrain.evaluate", "main_predict"))

    p = sub.add_parser("lr-find", help="LR range test: loss against learning rate, and a suggested lr")
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/lr-find"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)
    p.set_defaults(func=_command("lenstrain.lr_find", "main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
