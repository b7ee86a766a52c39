"""``python -m lenstrain``: train, eval, predict, lr-find."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

from lenstrain.checkpointing.rundir import RunDir, write_atomic
from lenstrain.config.schema import ConfigError, LenstrainConfig, dump_config, load_config
from shards.clikit import Command, run_cli
from shards.exitcodes import EXIT_ERROR

PROG = "lenstrain"
DESCRIPTION = "Train, evaluate and apply lensing models."


def check_against_shards(config: LenstrainConfig, world_size: int) -> None:
    """Raise :class:`ConfigError` naming every way ``config`` cannot train on its shard set."""
    from pydantic import ValidationError

    from lenstrain.run.preflight import preflight
    from shards.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(config.data.shards)
    except (ManifestError, ValidationError) as exc:
        raise ConfigError(problems=[("data.shards", str(exc).splitlines()[0])]) from None
    problems = preflight(config, manifest, world_size=world_size)
    if problems:
        raise ConfigError(problems=problems)


def _train(args) -> int:
    """Validate the config once, write it to the run's ``config.yaml``, and train (every rank from that file).

    The ranks ``--nproc`` starts are given the run's own ``config.yaml``: it was checked and written
    here, so they read it without checking or writing it again.
    """
    run = RunDir(args.run_dir)
    config = load_config(args.config, args.set)
    own_config = not args.set and Path(args.config).resolve() == run.config.resolve()
    if not own_config:
        check_against_shards(config, world_size=max(args.nproc, 1))
        if not check_same_run(run, config):  # nothing is written before this check
            run.root.mkdir(parents=True, exist_ok=True)
            write_atomic(run.config, dump_config(config))
    if args.nproc > 1:
        from lenstrain.parallel.spawn import spawn_local

        return spawn_local(["train", str(run.config), "--run-dir", str(run.root)], args.nproc)
    from lenstrain.run.train import run_training

    code = run_training(config, run.root)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_rank(code)
    return code


def _training_view(config: LenstrainConfig) -> dict:
    """The config as compared between runs: its JSON form with ``data.shards`` made absolute."""
    data = config.model_dump(mode="json")
    data["data"]["shards"] = str(Path(config.data.shards).resolve())
    return data


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every key that differs."""
    out = []
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_same_run(run: RunDir, config: LenstrainConfig) -> bool:
    """True when ``run`` already holds a run of this very config (it resumes); False when it holds none.

    A run's training keys are fixed, as the launcher has it: a run directory whose ``config.yaml`` differs is
    refused with :class:`ConfigError` (exit 2) listing every key that differs, and nothing is written.
    """
    if not run.config.is_file():
        return False
    previous = load_config(run.config)  # an unreadable one is refused, naming the file
    differences = config_differences(_training_view(previous), _training_view(config))
    if not differences:
        return True
    lines = [f"  {key}: {old!r} in the run, {new!r} now" for key, old, new in differences]
    raise ConfigError(
        f"{run.root} holds a run of another config ({run.config}); a run's training keys are fixed:\n"
        + "\n".join(lines)
        + "\n  Train this config as a new run with another --run-dir, or resume that run with "
        f"`python -m lenstrain train {run.config} --run-dir {run.root}`.")


def leave_rank(code: int) -> NoReturn:
    """End one rank of a ``--nproc`` run once training has closed its files and the process group: gloo may
    abort at interpreter exit ("terminate called without an active exception"), which would turn a finished
    rank into a failed one, so the rank leaves without the C++ teardown."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _command(module: str, function: str):
    def run(args) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML with the training sections, or a whole job file")
    p.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, TensorBoard events and logs go")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--profile", action="append_const", dest="set", const="train.profile={}",
                   help="trace steps 6-10 with torch.profiler into RUN/profile/ (train.profile sets the window)")


def _checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                   help="best by checkpoint.best_metric, or the newest complete one (default: best)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    _checkpoint_arg(p)
    p.add_argument("--shards", type=Path, help="evaluate on another shard set (default: the run's own)")
    p.add_argument("--tta", type=int, default=None, help="test-time rotation averaging over k 90-degree turns")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", type=Path, help="shard set to predict on")
    source.add_argument("--images", type=Path,
                        help="a .npy or FITS file, or a folder of them: (H,W), (C,H,W) or stacks (N,C,H,W); no packing")
    p.add_argument("--split", default="test", help="with --shards: split to predict (default: test)")
    p.add_argument("--out", type=Path, required=True, help="CSV to write (an existing file only with --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    _checkpoint_arg(p)
    p.add_argument("--step", type=int, default=None, help="the checkpoint of step N (default: --checkpoint's choice)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="with --images: images per batch (default: data.val_batch_size, else data.batch_size)")


def _lr_find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="config or job file, as for train")
    p.add_argument("--out", type=Path, default=Path("runs/lr-find"), help="output directory (default: runs/lr-find)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--min-lr", type=float, default=1e-7, help="first learning rate (default: 1e-7)")
    p.add_argument("--max-lr", type=float, default=1.0, help="last learning rate (default: 1)")
    p.add_argument("--steps", type=int, default=100, help="steps of the exponential ramp (default: 100)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the checkpoint of step N (default: the newest complete one)")
    which.add_argument("--best", action="store_true", help="the best checkpoint by checkpoint.best_metric")
    p.add_argument("--out", type=Path, required=True,
                   help="model.safetensors or model.pt; its description (model.json) goes beside it "
                        "(existing files only with --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file and its description")


COMMANDS = (
    Command("train", "train from a config or job file (resumes from the newest checkpoint)", _train_args, _train),
    Command("eval", "metrics and plots of a run's model on a split", _eval_args,
            _command("lenstrain.evaluation.evaluate", "main_eval")),
    Command("predict", "write a CSV of predictions for a shard set", _predict_args,
            _command("lenstrain.evaluation.evaluate", "main_predict")),
    Command("lr-find", "LR range test: loss against learning rate, and a suggested lr", _lr_find_args,
            _command("lenstrain.optimization.lr_find", "main")),
    Command("export", "write a run's model as one fp32 state dict (.safetensors or .pt) with model.json beside it",
            _export_args, _command("lenstrain.evaluation.export", "main")),
)


def _damaged(exc: BaseException) -> int:
    print(f"error: damaged shard set: {exc}\n  check it with: python -m shards verify DIR", file=sys.stderr)
    return EXIT_ERROR


def _unreadable(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from lenstrain.checkpointing.safepickle import CheckpointReadError
    from shards.manifest import ManifestError
    from shards.reader import CorruptSampleError

    return run_cli(PROG, DESCRIPTION, COMMANDS, argv, errors={CorruptSampleError: _damaged,
                                                               CheckpointReadError: _unreadable,
                                                               ManifestError: _unreadable})
