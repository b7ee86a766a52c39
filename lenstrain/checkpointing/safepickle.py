"""Which globals a pickle may name before anything unpickles it: the allowlist of DeepSpeed's checkpoints.

DeepSpeed's checkpoint files hold, besides tensors and plain values, objects of three DeepSpeed classes
(read off real ZeRO-0/1/2/3 checkpoints, with and without optimizer offload, in fp32, fp16 and bf16, and
off their universal layout; see ``tests/test_safe_pickle.py``). Two guards use that list:

- :func:`load_allowlisted` reads a file with ``torch.load(weights_only=True)`` inside
  ``torch.serialization.safe_globals(DEEPSPEED_CLASSES)``: lenstrain's own reads of DeepSpeed's files.
- :func:`check_pickle_file` scans the pickle's opcodes (:mod:`pickletools`) without running any, and
  refuses a file that names a global outside :data:`ALLOWED_GLOBALS`. It runs before DeepSpeed's own
  readers (``zero_to_fp32``, ``ds_to_universal``, the universal-checkpoint loader), which unpickle fully.

A refusal is an :class:`UntrustedFileError` that names the file and the global. Nothing here imports DeepSpeed
until a class of the allowlist is needed.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged, refused): the message names the file."""


class UntrustedFileError(CheckpointReadError):
    """A file that would need more than plain data to load: refused, naming the file and why."""


# DeepSpeed's own classes in its checkpoint files: (module, name).
DEEPSPEED_CLASS_NAMES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # the optimizer state's loss scaler (static: 1.0)
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # the optimizer state's ZeRO stage
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # ZeRO-1/2's parameter-to-partition map
)

_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")

# Everything a scanned pickle may name: what torch.save writes for tensors, parameters and ordered dicts, and
# DeepSpeed's classes above. Each is on torch's own weights_only list or in DEEPSPEED_CLASS_NAMES.
ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    *(f"torch.{kind}Storage" for kind in _STORAGES),
    *(f"torch.{dtype}" for dtype in _DTYPES),
    *(f"{module}.{name}" for module, name in DEEPSPEED_CLASS_NAMES),
})

MAX_PICKLE_BYTES = 1 << 30  # a data.pkl larger than this is no checkpoint's (its tensors live beside it)

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH_OPS = {"PROTO", "FRAME", "STOP", "POP", "POP_MARK", "MARK"}


def deepspeed_classes() -> list[type]:
    """The classes of :data:`DEEPSPEED_CLASS_NAMES` (imports DeepSpeed)."""
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_CLASS_NAMES]


def pickle_globals(data: bytes) -> list[str]:
    """Every global (``module.name``) the pickle ``data`` names, in order, found without running it.

    Raises :class:`pickle.UnpicklingError` for a stream that is not a pickle, or that names a global in a way
    the scan cannot tell (a ``STACK_GLOBAL`` whose names are not strings pushed just before it, an extension
    code).
    """
    found: list[str] = []
    memo: dict[int, object] = {}
    recent: list[object] = []  # what the last opcodes pushed: a str, or None for anything else
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                found.append(f"{module}.{qualname}")
                recent.append(None)
            elif name == "STACK_GLOBAL":
                module, qualname = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(qualname, str)):
                    raise pickle.UnpicklingError("a STACK_GLOBAL whose module and name the scan cannot tell")
                found.append(f"{module}.{qualname}")
                recent[-2:] = [None]
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise pickle.UnpicklingError(f"an extension code ({name} {arg}), which names a global indirectly")
            elif name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name in _GET_OPS:
                recent.append(memo.get(arg))
            elif name in _PUT_OPS:
                memo[arg] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name not in _NO_PUSH_OPS:
                recent.append(None)
            if len(recent) > 64:
                del recent[:-2]
    except (ValueError, KeyError, IndexError, TypeError, EOFError) as exc:  # pickletools on a damaged stream
        raise pickle.UnpicklingError(f"not a pickle ({exc})") from None
    return found


def file_pickles(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """The pickles of a torch checkpoint file: each ``.pkl`` record of its zip archive, as (record, bytes).

    A file that is not a zip archive is taken whole as one pickle stream (torch's legacy format starts with
    one)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            return [("", fh.read(MAX_PICKLE_BYTES + 1))]
    out = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.endswith(".pkl"):
                if info.file_size > MAX_PICKLE_BYTES:
                    raise pickle.UnpicklingError(f"its record {info.filename} has {info.file_size} bytes")
                out.append((info.filename, archive.read(info)))
    return out


def check_pickle_file(path: str | os.PathLike, allowed: frozenset[str] = ALLOWED_GLOBALS) -> None:
    """Refuse (:class:`UntrustedFileError`, naming the file and the global) a file whose pickles name a global
    outside ``allowed``, or that cannot be scanned. Nothing is unpickled."""
    try:
        records = file_pickles(path)
        if not records:
            raise pickle.UnpicklingError("no pickle in its archive")
        for record, data in records:
            for name in pickle_globals(data):
                if name not in allowed:
                    where = f" (record {record})" if record else ""
                    raise UntrustedFileError(f"{path}: refused, its pickle{where} names the global {name}, which is "
                                             f"not among those DeepSpeed's checkpoints hold; nothing was loaded")
    except (pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError,
            NotImplementedError, RuntimeError) as exc:
        raise UntrustedFileError(f"{path}: refused, it cannot be checked as a pickle ({exc}); nothing was "
                                 f"loaded") from None


def check_pickle_tree(directory: str | os.PathLike) -> None:
    """:func:`check_pickle_file` for every ``*.pt`` file under ``directory`` (what DeepSpeed's readers load)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        if path.is_file():
            check_pickle_file(path)


def refused_global(exc: BaseException) -> str:
    """The global named in torch's weights_only refusal, or a short reason."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "GLOBAL" in line or "got <" in line or "Unsupported" in line:
            return line
    return "not plain data"


def load_allowlisted(path: str | os.PathLike, allowed: tuple | list = (), map_location="cpu"):
    """``torch.load(weights_only=True)`` with the globals ``allowed`` (classes or functions) added.

    A refused global raises :class:`UntrustedFileError` naming the file and the global; a file that cannot be
    read for any other reason raises :class:`CheckpointReadError` naming it. No code from the file runs.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights_only unpickler refused it: nothing ran
        raise UntrustedFileError(f"{path}: refused, it holds more than tensors and plain values "
                                 f"({refused_global(exc)}); nothing was run") from None
    except MemoryError:
        raise CheckpointReadError(f"{path}: cannot be read (it asks for more memory than there is)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways (zip, storage, EOF)
        raise CheckpointReadError(f"{path}: cannot be read ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
