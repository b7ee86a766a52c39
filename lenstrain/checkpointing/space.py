"""Disk space for checkpoints: the estimate, the warning before a run, and the report when a write fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

FREE_SPACE_FACTOR = 2  # warn when the run directory has less free space than this many checkpoints


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message is one line for the user (see ``write_failure_line``)."""


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def estimate_checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About how many bytes one checkpoint takes: parameters, buffers and optimizer state.

    Before the first step an optimizer holds no state yet; it is then counted as two tensors the
    size of each parameter (Adam's moments, the most that the usual optimizers keep).
    """
    model_bytes = _tensor_bytes(model.state_dict())
    state = list(optimizer.state.values())  # not state_dict(): a wrapping engine may have swapped the params
    if state:
        return model_bytes + _tensor_bytes(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return model_bytes + 2 * sum(p.numel() * p.element_size() for p in params)


def checkpoint_bytes(step_dir: Path | None) -> int:
    """The bytes the files under ``step_dir`` take (0 when it does not exist)."""
    if step_dir is None or not Path(step_dir).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(step_dir).rglob("*") if p.is_file())


def _free_bytes(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists():  # a run directory not made yet: its nearest existing parent
        path = path.parent
    return shutil.disk_usage(path).free


def free_space_warning(run_dir: Path, nbytes: int) -> str | None:
    """A warning when ``run_dir`` has less than twice ``nbytes`` (one checkpoint's estimate) free, else None."""
    free = _free_bytes(run_dir)
    if free >= FREE_SPACE_FACTOR * nbytes:
        return None
    return (f"warning: {run_dir} has {format_bytes(free)} free, under {FREE_SPACE_FACTOR}x the estimated size of "
            f"a checkpoint ({format_bytes(nbytes)}: parameters, optimizer state and buffers); checkpoints may fail")


def write_failure_line(name: str, error: str, needed: int, ckpt_root: Path, previous: Path | None) -> str:
    """One line: the step, the error, the bytes needed against the bytes free, and the newest complete checkpoint."""
    newest = (f"the newest complete checkpoint is {previous}, left as it was" if previous
              else "there is no complete checkpoint yet")
    return (f"checkpoint {name} could not be written ({error}); it needs about {format_bytes(needed)} and "
            f"{ckpt_root} has {format_bytes(_free_bytes(ckpt_root))} free; its partial files were removed; {newest}")


def estimate_meta_checkpoint_bytes(model: nn.Module) -> int:
    """A checkpoint's size before anything is built for real, from the model made on the meta device (no memory):
    its parameters counted with two optimizer moments each, as :func:`estimate_checkpoint_bytes` does."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())
