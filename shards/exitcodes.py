"""Every exit status that lenstrain's commands, training ranks and SLURM tasks end with, and what it means.

The one table for all three floors: ``shards`` (the lowest, whose CLI kit exits 2) defines it, and
``lenstrain`` and ``launcher`` import it. The README's "When things go wrong" follows :data:`MEANINGS`
(``tests/test_exitcodes.py`` checks that). Above 128 is the shell's 128 + a signal's number.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_REQUEUE = 42
EXIT_CHECKPOINT_FAILED = 44
EXIT_RANK_LOST = 45
EXIT_PRUNED = 46
EXIT_INTERRUPTED = 130

MEANINGS: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_ERROR: "an error; its traceback or error line is above",
    EXIT_USAGE: "input that cannot be used (an option, a config key, a job file), each problem named; nothing ran",
    EXIT_NONFINITE: "a non-finite loss; training stopped naming the step, every checkpoint as it was",
    EXIT_REQUEUE: "stopped on a signal after a checkpoint saved by every rank together; asks for a requeue",
    EXIT_CHECKPOINT_FAILED: "a checkpoint could not be written (full disk, quota, I/O error); not requeued",
    EXIT_RANK_LOST: "a collective failed: another rank died, hung past parallel.timeout_s, or was lost",
    EXIT_PRUNED: "a sweep's pruner stopped the run, after a checkpoint",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C) outside training",
}
