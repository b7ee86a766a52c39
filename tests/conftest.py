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


# ------------------------------------------------------------------------------ launcher fixtures


def launcher_job_dict(shards, **sections) -> dict:
    """A small, exact job: 2 nodes x 1 task on the devcluster, alternet_tiny on 32x32 rings, fp32."""
    job = {
        "resources": {"cluster": "devcluster", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10,
                      "signal_delay_s": 30, "max_requeues": 3},
        "seed": 3,
        "data": {"shards": str(shards), "batch_size": 4, "workers": 0},
        "model": {"name": "alternet_tiny"},
        "optim": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "cosine"},
        "train": {"max_steps": 40, "precision": "fp32", "deterministic": True},
        "checkpoint": {"every_steps": 10, "keep": 10, "every_minutes": None},
        "log": {"every_steps": 1, "images": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


@pytest.fixture(scope="session")
def launcher_shards(tmp_path_factory):
    """A tiny real shard set (120 rings, 32x32) for launcher tests."""
    from tests.train_helpers import make_ring_shards

    return make_ring_shards(tmp_path_factory.mktemp("launcher-data") / "rings")


@pytest.fixture
def launcher_job(launcher_shards, tmp_path):
    """``launcher_job(name, **sections)`` writes a job YAML (see :func:`launcher_job_dict`) and returns its path."""
    import yaml

    def write(name: str = "job", **sections):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(launcher_job_dict(launcher_shards, **sections), sort_keys=False))
        return path

    return write
