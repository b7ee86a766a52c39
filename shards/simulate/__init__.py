"""Simulated strong-lensing shard sets (lenstronomy): ``python -m shards simulate`` and :func:`simulate`."""

from shards.simulate.cli import SimulateError, simulate
from shards.simulate.presets import INSTRUMENTS, Instrument, get_instrument
from shards.simulate.tasks import TASKS, Task, get_task

__all__ = [
    "INSTRUMENTS",
    "TASKS",
    "Instrument",
    "SimulateError",
    "Task",
    "get_instrument",
    "get_task",
    "simulate",
]
