"""The packing options: one dataclass that every command (simulate, import deeplense, import arrays) fills from
one set of command-line options and hands to :func:`shards.pack.pack_shard_set`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from shards.argtypes import default_workers, fraction, non_negative_int, positive_int
from shards.clikit import UsageError

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PackOptions:
    """How samples become a shard set: the split fractions and seed, shard size, stored dtype, workers, and
    what to do with an existing output or a bad sample. Invalid values raise :class:`UsageError`."""

    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    shard_size: int = 1000
    dtype: str = "float32"
    workers: int = 1
    overwrite: bool = False
    skip_bad: bool = False

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise UsageError("; ".join(problems))

    def _problems(self) -> list[str]:
        problems = [f"--{name} must be in [0, 1), got {value}" for name, value in (("val", self.val),
                                                                                  ("test", self.test))
                    if not 0.0 <= value < 1.0]
        if not problems and self.val + self.test >= 1.0:
            problems.append(f"--val ({self.val}) plus --test ({self.test}) must be below 1")
        for name, value, lowest in (("seed", self.seed, 0), ("shard-size", self.shard_size, 1),
                                    ("workers", self.workers, 1)):
            if not isinstance(value, int) or value < lowest:
                problems.append(f"--{name} must be an integer of at least {lowest}, got {value!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return problems

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PackOptions:
        """The options parsed by :func:`add_pack_options` (those a command lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def split_record(self) -> dict:
        """What the manifest's source records about the split."""
        return {"val": self.val, "test": self.test, "seed": self.seed}


def add_pack_options(parser: argparse.ArgumentParser, *, skip_bad: bool = True,
                     seed_help: str = "seed of the split and of the packing order") -> None:
    """``--out`` and the options of :class:`PackOptions`; ``skip_bad=False`` for sources that cannot be bad."""
    d = PackOptions()
    parser.add_argument("--out", required=True, type=Path, help="directory of the new shard set")
    parser.add_argument("--val", type=fraction, default=d.val,
                        help=f"fraction of samples for validation (default {d.val})")
    parser.add_argument("--test", type=fraction, default=d.test, help=f"fraction of samples for test (default {d.test})")
    parser.add_argument("--seed", type=non_negative_int, default=d.seed, help=f"{seed_help} (default {d.seed})")
    parser.add_argument("--shard-size", type=positive_int, default=d.shard_size,
                        help=f"samples per shard (default {d.shard_size})")
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype, help=f"image dtype in the shards (default {d.dtype})")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="worker processes (default: the usable CPU cores)")
    if skip_bad:
        parser.add_argument("--skip-bad", action="store_true",
                            help="skip unreadable or mis-shaped samples (and count them) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --out")
