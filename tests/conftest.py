from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

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

EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"  # DeepSpeed's compiled ops


# ------------------------------------------------------------------------------ parallel workers

# The modules of the tests marked ``slurm``; the collection hook below checks that the two agree.
SLURM_MODULES = frozenset({"test_devcluster.py", "test_launcher_slurm.py", "test_launcher_slurm_deepspeed.py",
                           "test_sweep_slurm.py", "test_cluster_users_slurm.py"})
SLURM_GROUP = "slurm"
DEVCLUSTER_WAIT_S = 2400  # how long a run waits for another run on this machine to bring its devcluster down


HEAVY = ("slow", "deepspeed", "multiprocess")  # what --quick leaves out


def pytest_collection_modifyitems(config, items):
    """SLURM tests first (the run's longest chain), then the modules with the most heavy tests (so that no
    worker is left with a long module at the end), each module's tests together and in their own order.
    SLURM tests may live only in :data:`SLURM_MODULES`."""
    heavy: dict[str, int] = {}
    for item in items:
        heavy[item.nodeid.split("::")[0]] = heavy.get(item.nodeid.split("::")[0], 0) + any(
            item.get_closest_marker(name) for name in HEAVY)
    def order(item):
        slurm = item.get_closest_marker("slurm") is not None
        return (not slurm, 0 if slurm else -heavy[item.nodeid.split("::")[0]])

    items.sort(key=order)  # stable
    first_slurm = next((item for item in items if item.get_closest_marker("slurm")), None)
    if first_slurm is not None:  # its setup may wait for another run's devcluster: past pytest's timeout
        first_slurm.add_marker(pytest.mark.timeout(DEVCLUSTER_WAIT_S + 600))
    misplaced = [item.nodeid for item in items
                 if (item.get_closest_marker("slurm") is not None) != (item.path.name in SLURM_MODULES)]
    if misplaced:
        raise pytest.UsageError(f"slurm tests belong in (and only in) {', '.join(sorted(SLURM_MODULES))} of "
                                f"tests/conftest.py: {', '.join(misplaced[:5])}")


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, which may train with DeepSpeed already
def pytest_runtest_setup(item):
    if item.get_closest_marker("deepspeed") is not None:
        build_deepspeed_ops()


_deepspeed_ops_built = False


def build_deepspeed_ops() -> None:
    """DeepSpeed compiles its shared-memory op on its first start in a clone (about 35 s on an idle machine,
    minutes on a loaded one), into ``.cache/torch_extensions``, which every DeepSpeed test uses. Build it
    once here, in this process, before the first DeepSpeed test of the worker, rather than inside a test's
    training subprocess, whose timeout could cut the build short and leave every later test to build again.
    Once built, a start only checks it (torch's lock makes concurrent workers wait for one build)."""
    global _deepspeed_ops_built
    if _deepspeed_ops_built:
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS_DIR)  # every DeepSpeed test and its subprocesses
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # the tests skip themselves without DeepSpeed
        return
    build_shm_op()
    _deepspeed_ops_built = True


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_xdist_make_scheduler(config, log):
    """How ``pytest -n N`` (``./run test``) shares the tests out, so that workers share nothing:

    - every SLURM test goes to one worker, which runs them all, first, in one devcluster session (the
      session fixture brings it up once; no other worker touches it), while the others take the rest;
    - every other module goes to one worker as a whole, so that its module-scoped fixtures (a reference
      run, a simulated set) are made once, as in a serial run.
    """
    from xdist.scheduler import LoadScopeScheduling

    class OneDevcluster(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SLURM_GROUP if module.rpartition("/")[2] in SLURM_MODULES else module

    config.option.loadscopereorder = False  # the collection's order: SLURM first
    return OneDevcluster(config, log)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real devcluster, up for the whole session; SLURM_CONF points at it. Fails (never skips) if
    ``slurm/devcluster up`` fails.

    The devcluster uses fixed ports and /etc/hosts entries, so two test runs on one machine take turns: the
    second waits here (up to 40 minutes) for the first to bring its cluster down."""
    lock = open("/tmp/lenstrain-slurm-session.lock", "w")  # noqa: SIM115 - held for the whole session
    deadline = time.monotonic() + DEVCLUSTER_WAIT_S
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
