"""Preemption: signals only set a flag; the loop agrees on it collectively at step boundaries.

SLURM sends SIGUSR2 (``--signal=USR2@N``) before a time limit or on preemption, and SIGTERM on an
external requeue or cancel. A collective checkpoint cannot run inside a signal handler, and a
handler that raises mid-collective would hang the other ranks, so every rank's handler just records
the signal. The loop all-reduces the flag once per step, all ranks save together, and the process
exits with :data:`EXIT_REQUEUE`, which the launcher turns into a requeue.
"""

from __future__ import annotations

import signal
import time

# Training's exit statuses, here for their importers; the table with their meanings is shards.exitcodes.
from shards.exitcodes import EXIT_CHECKPOINT_FAILED as EXIT_CHECKPOINT_FAILED
from shards.exitcodes import EXIT_NONFINITE as EXIT_NONFINITE
from shards.exitcodes import EXIT_REQUEUE as EXIT_REQUEUE

DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is None:
            self.signum, self.received_at = signum, time.time()

    @property
    def set(self) -> bool:
        return self.signum is not None

    def install(self, signals=DEFAULT_SIGNALS) -> PreemptionFlag:
        """Replace the handlers of ``signals`` (submitit's included) with one that sets the flag."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
