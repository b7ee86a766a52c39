"""``python -m shards``: pack data sets into shard sets, and verify and inspect them.

The subcommands are a table of :class:`~shards.clikit.Command` rows run by :func:`~shards.clikit.run_cli`.
Expected failures end with one ``error: ...`` line and no traceback: exit 2 for bad arguments, an existing
output directory, or a DIR that is not a shard set (missing, or no manifest.json: the argument is wrong); 1 for
bad data: a shard set whose manifest or shards are damaged, or a failed verification.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from shards.argtypes import positive_int
from shards.clikit import Command, Group, UsageError, fail, run_cli
from shards.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED
from shards.manifest import ManifestError, load_manifest
from shards.options import PackOptions, add_pack_options
from shards.pack import BadSample, OutputExistsError, PackResult, check_destination
from shards.reader import CorruptSampleError
from shards.sources.common import SourceError

PROG = "shards"
DESCRIPTION = "Build, verify and inspect lenstrain shard sets."


def report_pack(result: PackResult, out: Path) -> None:
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


def _existing(path: Path, kind: str) -> None:
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        raise UsageError(f"{path}: no such {kind}")


def _shard_set_dir(path: Path) -> None:
    """A DIR argument that names no shard set is a usage error (exit 2), missing or not; a damaged one is data."""
    from shards.manifest import MANIFEST_NAME, not_a_shard_set

    _existing(path, "directory")
    if not (path / MANIFEST_NAME).is_file():
        raise UsageError(not_a_shard_set(path))


# --------------------------------------------------------------------------- import

def run_import_deeplense(args: argparse.Namespace) -> int:
    from shards.sources.deeplense import import_deeplense

    options = PackOptions.from_args(args)
    check_destination(args.out, options.overwrite)  # before reading any source file
    _existing(args.src, "directory")
    report_pack(import_deeplense(args.src, args.out, options, value_name=args.value_name), args.out)
    return 0


def run_import_arrays(args: argparse.Namespace) -> int:
    from shards.sources.arrays import load_labels, pack_arrays

    options = PackOptions.from_args(args)
    check_destination(args.out, options.overwrite)
    for path in (args.images, args.labels):
        _existing(path, "file")
    labels = load_labels(args.labels, args.target_name, args.classification)
    result = pack_arrays(str(args.images), labels, args.out, options, primary=args.target,
                         classification=args.classification, source={"labels": str(args.labels)})
    report_pack(result, args.out)
    return 0


def add_deeplense_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, metavar="SRC", help="folder holding one subfolder per class")
    add_pack_options(p)
    p.add_argument("--value-name", default=None,
                   help="name of the regression target read from [image, value] files")


def add_arrays_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help=".npy image array")
    p.add_argument("--labels", type=Path, required=True, help="1-D .npy, or CSV with a header")
    p.add_argument("--target-name", default=None,
                   help="name of the target in a .npy label array (default: 'class' with --classification, "
                        "else 'label')")
    p.add_argument("--target", default=None, help="primary target: a CSV column (default: the first)")
    p.add_argument("--classification", action="store_true",
                   help="the primary target is a class label (classes: its sorted distinct values)")
    add_pack_options(p)


IMPORT = Group("import", "pack an existing data set into a shard set", metavar="SOURCE",
               description="Pack an existing data set into a shard set.", commands=[
    Command("deeplense", "DeepLense .npy class folders", add_deeplense_arguments, run_import_deeplense,
            description="Pack DeepLense-style class folders (SRC/<class>/*.npy, or SRC/{train,val}/<class>/*.npy) "
                        "into a shard set. A file holds an image (H,W), (C,H,W) or (H,W,C), or an object array "
                        "[image, value], read by a restricted unpickler (numpy arrays, dtypes and numbers only; "
                        "anything else is refused). Targets: 'class' (the sorted folder names) and, when object "
                        "arrays carry a number, a regression target named 'axion_mass' if only the axion folder "
                        "carries one, else 'label_value'. The split is stratified by class."),
    Command("arrays", "an image array with labels (.npy or CSV)", add_arrays_arguments, run_import_arrays,
            description="Pack an image array (N,H,W), (N,C,H,W) or (N,H,W,C) from a .npy with labels from a 1-D "
                        ".npy or a CSV with a header (columns are targets; text columns are classes). The split is "
                        "stratified by class, or by quantile bins of a regression target."),
])


# --------------------------------------------------------------------------- verify / inspect

def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import print_verify_summary, verify_shard_set

    _shard_set_dir(args.dir)

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
    print_verify_summary(report)
    return 0 if report.ok else 1


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="shard-set directory")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the shards that pass")


def run_inspect(args: argparse.Namespace) -> int:
    from shards.inspect import inspect_shard_set, print_inspection

    _shard_set_dir(args.dir)
    if args.grid is not None:
        splits = load_manifest(args.dir).splits
        if args.split not in splits:
            raise UsageError(f"--split {args.split}: not in the shard set (it has {', '.join(splits)})")
    print_inspection(inspect_shard_set(args.dir, sample_images=args.sample_images))
    if args.grid is not None:
        from shards.grid import write_grid

        print(f"wrote {write_grid(args.dir, args.grid, per_class=args.per_class, split=args.split)}")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="shard-set directory")
    p.add_argument("--grid", type=Path, default=None, metavar="PNG", help="write a grid of sample images here")
    p.add_argument("--per-class", type=positive_int, default=8, help="images per class in the grid (default 8)")
    p.add_argument("--split", default="train", help="split shown in the grid (default train)")
    p.add_argument("--sample-images", type=positive_int, default=64,
                   help="images per split read for the pixel statistics (default 64)")


VERIFY = Command(
    "verify", "check every shard against the manifest", add_verify_arguments, run_verify,
    description="Check every shard against the manifest: presence, size, sha256, the tar listing, and every "
                "member (offset, CRC-32, decoding, shape, dtype, finite values), then counts and train "
                "statistics. Exit 0 if all is well, 1 on any problem (each named by shard and member).")
INSPECT = Command(
    "inspect", "counts, target and image statistics, sample grid", add_inspect_arguments, run_inspect,
    description="Print counts per split and class, target statistics and image statistics; optionally write a "
                "PNG grid of sample images with their labels (asinh stretch).")


# --------------------------------------------------------------------------- simulate

def simulate_command() -> Command | None:
    """The simulator's row; an explanation if it cannot be imported, ``None`` if it is not in this tree."""
    try:
        from shards.simulate import cli as simulate_cli
    except ImportError as exc:
        if getattr(exc, "name", None) in ("shards.simulate", "shards.simulate.cli"):
            return None
        message = f"simulate is unavailable: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            print(f"error: {message}", file=sys.stderr)
            return EXIT_ERROR

        return Command("simulate", "(unavailable) simulate lensing images", lambda p: None, unavailable,
                       description=message)
    return Command("simulate", simulate_cli.HELP, simulate_cli.add_arguments, simulate_cli.run,
                   description=simulate_cli.description())


# --------------------------------------------------------------------------- main

def commands() -> list[Command | Group]:
    return [c for c in (simulate_command(), IMPORT, VERIFY, INSPECT) if c is not None]


def _data_error(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _interrupted(exc: BaseException) -> int:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


ERRORS = {
    OutputExistsError: lambda exc: fail(str(exc)),  # exit 2, like a usage error; before OSError below
    BadSample: _data_error, ManifestError: _data_error, SourceError: _data_error,
    CorruptSampleError: _data_error, OSError: _data_error,
    KeyboardInterrupt: _interrupted,
}

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
    return run_cli(PROG, DESCRIPTION, commands(), argv, errors=ERRORS)
