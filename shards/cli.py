"""``python -m shards``: pack data sets into shard sets, and verify and inspect them.

Each subcommand registers itself with ``set_defaults(func=run)``, where ``run(args) -> int`` returns
the exit status. Expected failures end with a one-line message and no traceback: exit 2 for bad
arguments or an existing output directory, 1 for bad data or a failed verification.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from shards.argtypes import default_workers, fraction, positive_int
from shards.manifest import ManifestError, load_manifest
from shards.pack import BadSample, OutputExistsError
from shards.reader import CorruptSampleError
from shards.sources.common import SourceError

PROG = "shards"


class UsageError(Exception):
    """A bad combination of arguments, found after parsing: exit 2."""


# --------------------------------------------------------------------------- argument types

def add_pack_options(parser: argparse.ArgumentParser) -> None:
    """Options every packing subcommand shares."""
    parser.add_argument("--out", required=True, type=Path, help="directory of the new shard set")
    parser.add_argument("--val", type=fraction, default=0.1, help="fraction of samples for validation (default 0.1)")
    parser.add_argument("--test", type=fraction, default=0.1, help="fraction of samples for test (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the packing order (default 0)")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="image dtype in the shards (default float32)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="processes reading samples (default: the usable CPU cores)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable or mis-shaped samples (and count them) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out")


def check_pack_args(args: argparse.Namespace) -> None:
    if args.val + args.test >= 1.0:
        raise UsageError(f"--val ({args.val}) plus --test ({args.test}) must be below 1")
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(f"{args.out} already exists; choose another --out or pass --overwrite")


def report_pack(result, out: Path) -> None:
    m = result.manifest
    counts = ", ".join(f"{name} {split.count}" for name, split in m.splits.items())
    n_shards = sum(len(split.shards) for split in m.splits.values())
    print(f"wrote {out}: {counts} samples in {n_shards} shards; image {tuple(m.image.shape)} {m.image.dtype}; "
          f"targets: {', '.join(f'{n} ({t.kind})' for n, t in m.targets.items())}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad samples:", file=sys.stderr)
        for line in result.skipped[:10]:
            print(f"  {line}", file=sys.stderr)
        if len(result.skipped) > 10:
            print(f"  ... and {len(result.skipped) - 10} more", file=sys.stderr)


# --------------------------------------------------------------------------- import

def run_import_deeplense(args: argparse.Namespace) -> int:
    from shards.sources.deeplense import import_deeplense

    check_pack_args(args)
    if not args.src.is_dir():
        raise UsageError(f"{args.src}: no such directory")
    result = import_deeplense(args.src, args.out, val=args.val, test=args.test, seed=args.seed,
                              shard_size=args.shard_size, dtype=args.dtype, workers=args.workers,
                              skip_bad=args.skip_bad, overwrite=args.overwrite, value_name=args.value_name)
    report_pack(result, args.out)
    return 0


def run_import_arrays(args: argparse.Namespace) -> int:
    from shards.sources.arrays import load_labels, pack_arrays

    check_pack_args(args)
    for path in (args.images, args.labels):
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    labels = load_labels(args.labels, args.target_name, args.classification)
    result = pack_arrays(str(args.images), labels, args.out, primary=args.target,
                         classification=args.classification, val=args.val, test=args.test, seed=args.seed,
                         shard_size=args.shard_size, dtype=args.dtype, workers=args.workers,
                         skip_bad=args.skip_bad, overwrite=args.overwrite,
                         source={"labels": str(args.labels)})
    report_pack(result, args.out)
    return 0


def add_import_parser(subparsers) -> None:
    parser = subparsers.add_parser("import", help="pack an existing data set into a shard set",
                                   description="Pack an existing data set into a shard set.")
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sources.add_parser(
        "deeplense", help="DeepLense .npy class folders",
        description="Pack DeepLense-style class folders (SRC/<class>/*.npy, or SRC/{train,val}/<class>/*.npy) "
                    "into a shard set. A file holds an image (H,W), (C,H,W) or (H,W,C), or an object array "
                    "[image, value] (unpickled: import only files you trust). Targets: 'class' (the sorted "
                    "folder names) and, when object arrays carry a number, a regression target named "
                    "'axion_mass' if only the axion folder carries one, else 'label_value'. The split is "
                    "stratified by class.")
    p.add_argument("src", type=Path, metavar="SRC", help="folder holding one subfolder per class")
    add_pack_options(p)
    p.add_argument("--value-name", default=None,
                   help="name of the regression target read from [image, value] files")
    p.set_defaults(func=run_import_deeplense, _parser=p)

    p = sources.add_parser(
        "arrays", help="an image array with labels (.npy or CSV)",
        description="Pack an image array (N,H,W), (N,C,H,W) or (N,H,W,C) from a .npy with labels from a 1-D "
                    ".npy or a CSV with a header (columns are targets; text columns are classes). The split is "
                    "stratified by class, or by quantile bins of a regression target.")
    p.add_argument("--images", type=Path, required=True, help=".npy image array")
    p.add_argument("--labels", type=Path, required=True, help="1-D .npy, or CSV with a header")
    p.add_argument("--target-name", default=None,
                   help="name of the target in a .npy label array (default: 'class' with --classification, "
                        "else 'label')")
    p.add_argument("--target", default=None, help="primary target: a CSV column (default: the first)")
    p.add_argument("--classification", action="store_true",
                   help="the primary target is a class label (classes: its sorted distinct values)")
    add_pack_options(p)
    p.set_defaults(func=run_import_arrays, _parser=p)


# --------------------------------------------------------------------------- verify / inspect

def _check_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")


def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify_shard_set

    _check_dir(args.dir)

    def on_shard(result) -> None:
        for line in result.problems:
            print(line, flush=True)
        if args.verbose and not result.problems:
            print(f"{result.name}: ok ({result.count} samples)", flush=True)

    report = verify_shard_set(args.dir, on_shard=on_shard)
    shard_lines = {line for r in report.shards for line in r.problems}
    for line in report.problems:
        if line not in shard_lines:
            print(line)
    _print_verify_summary(report)
    return 0 if report.ok else 1


def _print_verify_summary(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 120)
    table = Table(title=f"verify {report.directory}")
    for col in ("split", "shards", "samples", "MB", "bad shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split in report.manifest.splits:
        rows = [r for r in report.shards if r.split == split]
        bad = sum(1 for r in rows if r.problems)
        table.add_row(split, str(len(rows)), str(sum(r.count for r in rows)),
                      f"{sum(r.bytes for r in rows) / 1e6:.1f}", str(bad), style="red" if bad else None)
    console.print(table)
    if report.ok:
        console.print(f"OK: {len(report.shards)} shards, {report.samples} samples match the manifest")
    else:
        console.print(f"FAILED: {len(report.problems)} problems")


def run_inspect(args: argparse.Namespace) -> int:
    from shards.inspect import inspect_shard_set, print_inspection

    _check_dir(args.dir)
    if args.grid is not None:
        splits = load_manifest(args.dir).splits
        if args.split not in splits:
            raise UsageError(f"--split {args.split}: not in the shard set (it has {', '.join(splits)})")
    info = inspect_shard_set(args.dir, sample_images=args.sample_images)
    print_inspection(info)
    if args.grid is not None:
        from shards.grid import write_grid

        path = write_grid(args.dir, args.grid, per_class=args.per_class, split=args.split)
        print(f"wrote {path}")
    return 0


def add_verify_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check every shard against the manifest",
        description="Check every shard against the manifest: presence, size, sha256, the tar listing, and "
                    "every member (offset, CRC-32, decoding, shape, dtype, finite values), then counts and "
                    "train statistics. Exit 0 if all is well, 1 on any problem (each named by shard and member).")
    p.add_argument("dir", type=Path, metavar="DIR", help="shard-set directory")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the shards that pass")
    p.set_defaults(func=run_verify, _parser=p)


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="counts, target and image statistics, sample grid",
        description="Print counts per split and class, target statistics and image statistics; optionally "
                    "write a PNG grid of sample images with their labels (asinh stretch).")
    p.add_argument("dir", type=Path, metavar="DIR", help="shard-set directory")
    p.add_argument("--grid", type=Path, default=None, metavar="PNG", help="write a grid of sample images here")
    p.add_argument("--per-class", type=positive_int, default=8, help="images per class in the grid (default 8)")
    p.add_argument("--split", default="train", help="split shown in the grid (default train)")
    p.add_argument("--sample-images", type=positive_int, default=64,
                   help="images per split read for the pixel statistics (default 64)")
    p.set_defaults(func=run_inspect, _parser=p)


def add_simulate_parser(subparsers) -> None:
    try:
        from shards.simulate.cli import add_parser
    except ImportError as exc:
        if getattr(exc, "name", None) in ("shards.simulate", "shards.simulate.cli"):
            return  # not installed in this tree
        message = f"simulate is unavailable: {exc}"
        p = subparsers.add_parser("simulate", help="(unavailable) simulate lensing images", description=message)

        def unavailable(args: argparse.Namespace) -> int:
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 1

        p.set_defaults(func=unavailable)
        return
    add_parser(subparsers)


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Build, verify and inspect lenstrain shard sets.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_simulate_parser(subparsers)
    add_import_parser(subparsers)
    add_verify_parser(subparsers)
    add_inspect_parser(subparsers)
    return parser


_MAIN_PID = os.getpid()


def _on_sigterm(signum, frame):
    """Turn SIGTERM (scancel, a time limit) into SystemExit so that a partial shard set is cleaned up."""
    if os.getpid() != _MAIN_PID:  # a forked packing worker: just go
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        getattr(args, "_parser", parser).error(str(exc))  # exits 2
    except OutputExistsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (BadSample, ManifestError, SourceError, CorruptSampleError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
