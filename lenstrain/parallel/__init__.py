"""Parallel backends behind one interface (:class:`Backend`), chosen by name from :data:`BACKENDS`.

``single`` runs one process, ``ddp`` replicates the model across ranks, ``deepspeed`` partitions it
with ZeRO. DeepSpeed itself is imported only when a ``deepspeed`` backend is built.
"""

from __future__ import annotations

from lenstrain.parallel.base import Backend
from lenstrain.parallel.ddp import DDPBackend
from lenstrain.parallel.deepspeed import DeepSpeedBackend
from lenstrain.parallel.distributed import DistInfo

BACKENDS: dict[str, type[Backend]] = {"single": Backend, "ddp": DDPBackend, "deepspeed": DeepSpeedBackend}

__all__ = ["BACKENDS", "Backend", "DDPBackend", "DeepSpeedBackend", "build_backend"]


def build_backend(
    strategy: str, model, optimizer, info: DistInfo, *, precision: str, grad_clip, **options
) -> Backend:
    """The backend named ``strategy``, given the ``options`` it declares (those of the others are ignored)."""
    cls = BACKENDS.get(strategy)
    if cls is None:
        raise ValueError(f"unknown parallel.strategy {strategy!r}; valid: {', '.join(BACKENDS)}")
    unknown = set(options).difference(*(backend.options for backend in BACKENDS.values()))
    if unknown:
        raise TypeError(f"build_backend() got unknown options {sorted(unknown)}")
    if info.world_size > 1 and not cls.multi_rank:
        raise ValueError(f"parallel.strategy {strategy!r} runs one process; use 'ddp' for several")
    own = {key: value for key, value in options.items() if key in cls.options}
    return cls(model, optimizer, info, precision=precision, grad_clip=grad_clip, **own)
