from __future__ import annotations

import fcntl
import os
import time

import pytest
import torch
import yaml

from tests.factories import launcher_job_dict, make_ring_shards
from tests.slurm_helpers import start_cluster, stop_cluster

# Tests use tiny models: one thread each beats contending threads on a small CI machine, and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LENSTRAIN_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real devcluster, up for the whole session; SLURM_CONF points at it. Fails (never skips) if
    ``slurm/devcluster up`` fails.

    The devcluster uses fixed ports and /etc/hosts entries, so two test runs on one machine take turns: the
    second waits here (up to 40 minutes) for the first to bring its cluster down."""
    lock = open("/tmp/lenstrain-slurm-session.lock", "w")  # noqa: SIM115 - held for the whole session
    deadline = time.monotonic() + 2400
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise RuntimeError("another test run holds the devcluster (/tmp/lenstrain-slurm-session.lock)") from None
            time.sleep(2)
    try:
        yield from _cluster_session()
    finally:
        lock.close()


def _cluster_session():
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


# ------------------------------------------------------------------------------ shared data and jobs


@pytest.fixture(scope="session")
def ring_shards(tmp_path_factory):
    """The small ring shard set (120 rings of 32x32, see :func:`tests.factories.make_ring_shards`), packed
    once per session; tests read it and never write into it."""
    return make_ring_shards(tmp_path_factory.mktemp("data") / "rings")


@pytest.fixture(scope="session")
def launcher_shards(ring_shards):
    """The same set, under the name the launcher tests use."""
    return ring_shards


@pytest.fixture
def launcher_job(ring_shards, tmp_path):
    """``launcher_job(name, **sections)`` writes a job YAML (see :func:`launcher_job_dict`) and returns its path."""

    def write(name: str = "job", **sections):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(launcher_job_dict(ring_shards, **sections), sort_keys=False))
        return path

    return write
