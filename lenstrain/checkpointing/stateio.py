"""The files inside a checkpoint: written so that a full disk raises the OS's error, read without running code.

Every state file is a ``torch.save`` of tensors and plain Python values, read back with
``torch.load(weights_only=True)``. The RNG states are stored the same way (tensors and lists), so a
file dropped into a shared run directory cannot run code on resume. DeepSpeed's own files also hold
objects of three DeepSpeed classes: they are read with ``weights_only=True`` and those classes allowed
(:mod:`lenstrain.checkpointing.safepickle`), and only when the checkpoint's ``COMPLETE`` marker lists them with the same
size and sha256; before DeepSpeed's own readers unpickle a checkpoint, every pickle in it is scanned and a
global outside that allowlist is refused, naming the file and the global.

The ``COMPLETE`` marker is validated against its schema (:func:`read_marker`); any failure to read a
checkpoint file raises a :class:`CheckpointReadError` that names the file.

This module imports no other part of lenstrain but :mod:`lenstrain.checkpointing.safepickle`, and DeepSpeed only inside
:func:`load_deepspeed_model_state`, for a ZeRO checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from lenstrain.checkpointing.safepickle import (
    CheckpointReadError,
    UntrustedFileError,
    check_pickle_tree,
    deepspeed_classes,
    load_allowlisted,
)

__all__ = ["COMPLETE", "DEEPSPEED_DIR", "CheckpointReadError", "MarkerError", "UntrustedFileError",
           "load_deepspeed_model_state", "load_listed_pickle", "load_rng_file", "load_state_file", "read_marker",
           "rng_state", "save_state_file", "set_rng_state", "sha256_file", "verify_checkpoint"]

COMPLETE = "COMPLETE"  # written last into a checkpoint: the size and sha256 of every other file
DEEPSPEED_DIR = "deepspeed"  # the DeepSpeed engine's own files, inside a checkpoint


class MarkerError(CheckpointReadError):
    """A ``COMPLETE`` marker that does not match its schema; the message names the marker file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """A state file of tensors and plain values (and the ``allowed`` globals); anything else is refused.

    Raises :class:`UntrustedFileError` (a refused global) or :class:`CheckpointReadError` (a damaged file),
    each naming ``path``."""
    return load_allowlisted(path, allowed, map_location=map_location)


# ------------------------------------------------------------------------------------ the COMPLETE marker


_SHA256 = re.compile(r"[0-9a-f]{64}")
_STEP_DIR = re.compile(r"step-(\d{8})")


def _marker_problem(data, step_dir: Path) -> str | None:
    """How a parsed ``COMPLETE`` marker departs from its schema: ``{"step": N, "files": {name: {"bytes": B,
    "sha256": HEX}}}``, each name a relative path inside the checkpoint."""
    if not isinstance(data, dict):
        return f"the top level must be an object with step and files, got {type(data).__name__}"
    extra = sorted(set(data) - {"step", "files"})
    if extra:
        return f"unknown key {extra[0]!r}; valid keys: step, files"
    if "step" not in data or "files" not in data:
        return f"required key {'step' if 'step' not in data else 'files'!r} is missing"
    step = data["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step must be a non-negative integer, got {step!r}"
    named = _STEP_DIR.fullmatch(step_dir.name)
    if named and int(named.group(1)) != step:
        return f"step {step} is not the directory's ({step_dir.name})"
    files = data["files"]
    if not isinstance(files, dict):
        return f"files must be an object of file name -> {{bytes, sha256}}, got {type(files).__name__}"
    for name, entry in files.items():
        where = f"files[{name!r}]"
        parts = PurePosixPath(name).parts
        if (not name or name.startswith("/") or "\\" in name or any(p in ("..", ".") for p in parts)
                or any(ord(c) < 32 or ord(c) == 127 for c in name) or name == COMPLETE):
            return f"{where}: not a file name inside the checkpoint"
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"}:
            return f"{where} must be an object with exactly bytes and sha256"
        size, digest = entry["bytes"], entry["sha256"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"{where}.bytes must be a non-negative integer, got {size!r}"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"{where}.sha256 must be 64 lowercase hex digits, got {digest!r}"
    return None


def read_marker(step_dir: str | os.PathLike) -> dict[str, dict]:
    """The files a checkpoint's ``COMPLETE`` marker lists (name -> {bytes, sha256}), validated against its schema.

    Raises :class:`MarkerError` naming the marker for a missing, unreadable or mis-shaped one."""
    step_dir = Path(step_dir)
    marker = step_dir / COMPLETE
    try:
        data = json.loads(marker.read_bytes())
    except FileNotFoundError:
        raise MarkerError(f"{marker}: missing") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MarkerError(f"{marker}: not valid JSON ({exc})") from None
    problem = _marker_problem(data, step_dir)
    if problem is not None:
        raise MarkerError(f"{marker}: {problem}")
    return data["files"]


def verify_checkpoint(step_dir: Path) -> str | None:
    """None if ``step_dir`` is complete and intact, else the reason it is not (naming the file)."""
    step_dir = Path(step_dir)
    if not (step_dir / COMPLETE).is_file():
        return "no COMPLETE marker"
    try:
        listing = read_marker(step_dir)
    except MarkerError as exc:
        return str(exc)
    for name, expected in listing.items():
        problem = _file_problem(step_dir / name, name, expected)
        if problem is not None:
            return problem
    return None


def _file_problem(path: Path, name: str, expected: dict) -> str | None:
    try:
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, expected {expected['bytes']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{path} does not match its checksum"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return None


def load_listed_pickle(path: str | os.PathLike, step_dir: str | os.PathLike, map_location=None):
    """Load ``path``, a DeepSpeed file of the checkpoint ``step_dir``, only if its ``COMPLETE`` marker lists it.

    The file must be listed in the marker with the same size and sha256 as when the run wrote it, so a file
    added or changed afterwards is refused. It is then read with ``weights_only=True``, allowing only the
    DeepSpeed classes its checkpoints hold (:data:`lenstrain.checkpointing.safepickle.DEEPSPEED_CLASS_NAMES`): a file that
    names any other global is refused, naming the file and the global, and nothing from it runs. (The marker
    is a checksum, not a signature; the allowlist is what keeps a copied run directory from running code.)
    """
    path, step_dir = Path(path), Path(step_dir)
    name = path.relative_to(step_dir).as_posix()
    try:
        expected = read_marker(step_dir).get(name)
    except MarkerError as exc:
        raise UntrustedFileError(f"{path}: the checkpoint's marker is unusable ({exc}); refusing to read it") from None
    problem = "it is not listed" if expected is None else _file_problem(path, name, expected)
    if problem is not None:
        raise UntrustedFileError(f"{path}: not a file this run wrote ({problem} in {step_dir / COMPLETE}); "
                                 f"refusing to unpickle it")
    return load_allowlisted(path, deepspeed_classes(), map_location=map_location or "cpu")


def _consolidated_zero(step_dir: Path, ckpt: Path) -> dict:
    """The fp32 weights consolidated from every rank's ZeRO partition, by DeepSpeed's own reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_pickle_tree(ckpt)  # DeepSpeed's reader unpickles fully: every global it would meet, allowed first
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it reports every tensor
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_DIR)
    except Exception as exc:  # noqa: BLE001 - a damaged partition fails in many ways
        raise CheckpointReadError(f"{ckpt}: DeepSpeed cannot consolidate its ZeRO partitions "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


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
        raise CheckpointReadError(f"{ckpt} holds no DeepSpeed model states")
    module = load_listed_pickle(model_states, step_dir, map_location="cpu")
    if not isinstance(module, dict) or not isinstance(module.get("module"), dict):
        raise CheckpointReadError(f"{model_states}: holds no 'module' state dict")
    module = module["module"]
    state = _consolidated_zero(step_dir, ckpt) if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")) else module
    missing = set(module) - set(state)
    if missing:
        raise CheckpointReadError(f"the DeepSpeed checkpoint in {ckpt} lacks {sorted(missing)}")
    if not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointReadError(f"{model_states}: its module state holds values that are not tensors")
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
