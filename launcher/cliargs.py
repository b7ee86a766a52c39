"""Argument groups that several launcher commands share (``submit``, ``resume``, ``sweep``, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_job_args(p: argparse.ArgumentParser, *, nproc: bool = True) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. optim.lr=3e-4 or resources.nodes=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved job; submit nothing")
    p.add_argument("--local", action="store_true", help="run on this machine in the foreground (CPU, or its GPUs)")
    if nproc:
        p.add_argument("--nproc", type=int, default=None,
                       help="local processes (default: resources.tasks_per_node, capped to this machine)")


def add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", type=Path, default=None, help="where runs live (default: runs/)")
