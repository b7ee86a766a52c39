"""Reading one ``.npy`` file without running code from it.

A numeric array loads with ``allow_pickle=False``. An object array, as DeepLense stores ``[image, value]``,
is a pickle: it is read by an unpickler that builds numpy arrays, dtypes and Python numbers and refuses
every other global, so a crafted file cannot call a function (``os.system`` or any other) while it loads.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from shards.pack import BadSample

# What ``np.save`` of an object array ``[ndarray, number]`` refers to (read off real files with pickletools):
# ndarray and dtype, and multiarray's _reconstruct (an array) and scalar (a numpy number). numpy 2 spells the
# module numpy._core.multiarray, numpy 1 numpy.core.multiarray.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
})


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that asks for something other than numpy arrays, dtypes and numbers."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickle(f"its pickle asks for {module}.{name}; only numpy arrays, dtypes and numbers "
                                "are loaded from object arrays")
        return super().find_class(module, name)


def _read_object_array(path: str | os.PathLike):
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"an object array in .npy format version {version[0]}.{version[1]}")
        read_header(fh)
        return _NumpyOnlyUnpickler(fh, encoding="latin1").load()


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """Load one ``.npy``; object arrays (and only those) go through the restricted unpickler."""
    try:
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise
            arr = _read_object_array(path)
    except RefusedPickle as exc:
        raise BadSample(f"refused to load: {exc}") from None
    except Exception as exc:  # a damaged file can fail in many ways, the unpickler included
        raise BadSample(f"cannot read .npy ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise BadSample(f"not a .npy array (found {type(arr).__name__})")
    return arr
