"""How the tasks of one multi-task array task agree on what to train next.

A trial whose base job has several tasks (nodes x tasks_per_node) runs as one SLURM array task of that many
tasks, each calling the worker. Only the leader (SLURM_PROCID 0) talks to the study: it claims a trial,
prepares its run directory, then writes an *order* that the other tasks (followers) read before they all
train the trial together as one ordinary multi-rank run. Orders live on the shared filesystem the runs use:
``SWEEP/.orders/<job id>-<restart>/NNNN.json``, numbered from 0 in each attempt of the array task, written
atomically, so a follower never reads half an order and a requeued attempt starts a fresh sequence.

While it has no order to give (the study waits for others' trials), the leader touches ``alive`` in the same
folder; a follower whose leader has neither ordered nor touched it for ``patience_s`` leaves.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lenstrain.checkpointing.rundir import write_atomic

ORDERS_DIR = ".orders"
TRAIN, DONE = "train", "done"


def task_rank() -> int:
    """This task's place in its array task: SLURM_PROCID (0 for a one-task worker or a local one)."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def task_count() -> int:
    return int(os.environ.get("SLURM_NTASKS", "1"))


_FIRST_PORT: list[int] = []  # this worker's MASTER_PORT before its first trial (the job's, or the user's)


def use_trial_port(trial: int) -> None:
    """Give each trial of a multi-task array task its own MASTER_PORT (the job's port plus 1 + the trial number,
    wrapped in the launcher's port range), set by the leader and each follower alike before the trial starts.
    With one port for every trial, a task still closing the last trial's process group can reach the next
    trial's rendezvous store, started on the same port, and upset its count."""
    from lenstrain.parallel.distributed import MASTER_PORT_BASE, MASTER_PORT_SPAN, master_port_for_job

    if not _FIRST_PORT:
        given = os.environ.get("MASTER_PORT")
        _FIRST_PORT.append(int(given) if given else master_port_for_job(os.environ.get("SLURM_JOB_ID", "0")))
    offset = (_FIRST_PORT[0] - MASTER_PORT_BASE + 1 + trial) % MASTER_PORT_SPAN
    os.environ["MASTER_PORT"] = str(MASTER_PORT_BASE + offset)


@dataclass
class Orders:
    """The order sequence of one attempt of one array task."""

    folder: Path
    sequence: int = 0

    @classmethod
    def for_this_task(cls, sweep_root: Path) -> Orders:
        job = os.environ.get("SLURM_JOB_ID", f"local-{os.getppid()}")
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        return cls(Path(sweep_root) / ORDERS_DIR / f"{job}-{restart}")

    def _path(self, sequence: int) -> Path:
        return self.folder / f"{sequence:04d}.json"

    def give(self, what: str, trial: int | None = None) -> None:
        """The leader: the next order (``train`` a trial number, or ``done``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(self.sequence), json.dumps({"order": what, "trial": trial}) + "\n")
        self.sequence += 1

    def heartbeat(self) -> None:
        """The leader, while it waits for a trial to claim: still here."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "alive").touch()

    def take(self, patience_s: float, poll_s: float = 0.2) -> dict | None:
        """A follower: the next order; None when the leader went silent for ``patience_s``."""
        path, since = self._path(self.sequence), time.monotonic()
        while not path.is_file():
            if time.monotonic() - max(since, self._last_heartbeat()) > patience_s:
                return None
            time.sleep(poll_s)
        self.sequence += 1
        return json.loads(path.read_text())

    def _last_heartbeat(self) -> float:
        """The leader's last touch, on this process's monotonic clock (0 when it never touched)."""
        try:
            age = time.time() - (self.folder / "alive").stat().st_mtime
        except OSError:
            return 0.0
        return time.monotonic() - max(0.0, age)
