from __future__ import annotations

import os

import pytest
import torch

from tests.slurm_helpers import start_cluster, stop_cluster

# Tests use tiny models: one thread each beats contending threads on a small CI machine, and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LENSTRAIN_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real devcluster, up for the whole session; SLURM_CONF points at it. Fails (never skips) if
    ``slurm/devcluster up`` fails."""
    try:
        cluster = start_cluster()
    except Exception:
        stop_cluster()
        raise
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stop_cluster()
