"""The files inside a checkpoint: written so that a full disk raises the OS's error, read without running code.

Every state file is a ``torch.save`` of tensors and plain Python values, read back with
``torch.load(weights_only=True)``. The RNG states are stored the same way (tensors and lists), so a
file dropped into a shared run directory cannot run code on resume. DeepSpeed's own files hold
objects of its classes and need a full unpickle; :func:`load_listed_pickle` confines that to files
that the run's ``COMPLETE`` marker lists with the same size and sha256.

This module imports no other part of lenstrain, and DeepSpeed only inside
:func:`load_deepspeed_model_state`, for a ZeRO checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

COMPLETE = "COMPLETE"  # written last into a checkpoint: the size and sha256 of every other file
DEEPSPEED_DIR = "deepspeed"  # the DeepSpeed engine's own files, inside a checkpoint


class UntrustedFileError(ValueError):
    """A file that would need a full unpickle but is not one the run wrote."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class _ErrorKeepingWriter:
    """A file for ``torch.save`` that keeps the OSError of a failed write, which torch reports only vaguely."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_state_file(state, path: str | os.PathLike) -> None:
    """``torch.save(state, path)``; a failed write (full disk, quota, I/O error) raises its OSError, naming ``path``."""
    try:
        with open(path, "wb") as fh:
            writer = _ErrorKeepingWriter(fh)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None


def load_state_file(path: str | os.PathLike, map_location="cpu", allowed: tuple = ()):
    """A state file of tensors and plain values (and the ``allowed`` globals); anything else is refused."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "got <" in line),
                       "not plain data")
        raise UntrustedFileError(f"{path}: refused, it holds more than tensors and plain values ({refused})") from None


# ------------------------------------------------------------------------------------ the COMPLETE marker


def verify_checkpoint(step_dir: Path) -> str | None:
    """None if ``step_dir`` is complete and intact, else the reason it is not."""
    marker = Path(step_dir) / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker"
    try:
        listing = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable COMPLETE marker ({exc})"
    for name, expected in listing.items():
        problem = _file_problem(Path(step_dir) / name, name, expected)
        if problem is not None:
            return problem
    return None


def _file_problem(path: Path, name: str, expected: dict) -> str | None:
    if not path.is_file():
        return f"{name} is missing"
    if path.stat().st_size != expected["bytes"]:
        return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
    if sha256_file(path) != expected["sha256"]:
        return f"{name} does not match its checksum"
    return None


def load_listed_pickle(path: str | os.PathLike, step_dir: str | os.PathLike, map_location=None):
    """Fully unpickle ``path``, a file of the checkpoint ``step_dir``, only if its ``COMPLETE`` marker lists it.

    For DeepSpeed's files, which hold objects of DeepSpeed's classes beside the tensors. The file must
    be listed in the marker with the same size and sha256 as when the run wrote it, so a file added or
    changed afterwards is refused. The marker is no signature: whoever can rewrite it can still make
    the run unpickle a file of theirs, so a run directory must be writable only by those who run it.
    """
    path, step_dir = Path(path), Path(step_dir)
    name = str(path.relative_to(step_dir))
    try:
        expected = json.loads((step_dir / COMPLETE).read_text())["files"].get(name)
    except (OSError, ValueError, KeyError) as exc:
        raise UntrustedFileError(f"{path}: the checkpoint's {COMPLETE} marker is unreadable ({exc})") from None
    problem = "it is not listed" if expected is None else _file_problem(path, name, expected)
    if problem is not None:
        raise UntrustedFileError(f"{path}: not a file this run wrote ({problem} in {step_dir / COMPLETE}); "
                                 f"refusing to unpickle it")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_deepspeed_model_state(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights in a DeepSpeed checkpoint, as a plain fp32 state dict.

    ZeRO checkpoints are consolidated from every rank's fp32 partition; a checkpoint without ZeRO
    holds the whole module in its model states. DeepSpeed's reader unpickles every file fully, so the
    whole checkpoint must first match its ``COMPLETE`` marker (see :func:`load_listed_pickle`).
    """
    step_dir = Path(step_dir)
    ckpt = step_dir / DEEPSPEED_DIR
    problem = verify_checkpoint(step_dir)
    if problem is not None:
        raise UntrustedFileError(f"{step_dir}: not a checkpoint as the run wrote it ({problem}); refusing to read "
                                 f"its DeepSpeed files")
    candidates = [ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"]  # ZeRO-3
    model_states = next((p for p in candidates if p.is_file()), None)
    if model_states is None:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states")
    module = load_listed_pickle(model_states, step_dir, map_location="cpu")["module"]
    if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it reports every tensor
            state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_DIR)
    else:
        state = module
    missing = set(module) - set(state)
    if missing:
        raise ValueError(f"the DeepSpeed checkpoint in {ckpt} lacks {sorted(missing)}")
    # the order of model.state_dict(): parameters and buffers interleaved by module
    ordered = {k: state[k] for k in module} | {k: v for k, v in state.items() if k not in module}
    return {k: v.float() if v.is_floating_point() else v for k, v in ordered.items()}


# ------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) generators' states, as tensors, lists and numbers."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [key, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s result (or the tuples and arrays that earlier versions saved)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    key, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys
    np.random.set_state((key, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_file(path: str | os.PathLike) -> dict:
    """An ``rng-rankR.pt`` file. Files of earlier versions hold a numpy array, allowed as plain data."""
    numpy_array = (np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))
    return load_state_file(path, allowed=numpy_array)
