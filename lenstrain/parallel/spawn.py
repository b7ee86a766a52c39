"""Run N local training processes that form one gloo/NCCL group (``--nproc N``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lenstrain.parallel.distributed import free_port


def spawn_local(argv: list[str], nproc: int, env: dict | None = None) -> int:
    """Start ``python -m lenstrain <argv>`` ``nproc`` times with RANK/WORLD_SIZE/... set.

    Signals sent to this process (SIGUSR2, SIGTERM, SIGINT) are forwarded to every child, so a
    preemption reaches all ranks. Returns the first non-zero exit status, else 0.
    """
    base = dict(os.environ if env is None else env)
    base.update({"WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        base.pop(key, None)
    children = []
    for rank in range(nproc):
        child_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        children.append(subprocess.Popen([sys.executable, "-m", "lenstrain", *argv], env=child_env))

    def forward(signum, frame):  # noqa: ARG001
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((c for c in codes if c != 0), 0)
