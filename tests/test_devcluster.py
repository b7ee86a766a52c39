"""The real single-machine SLURM cluster: jobs, multi-node steps, preemption with requeue, the script's
own commands. No mocks; every wait is bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_helpers import (
    devcluster,
    sacct_records,
    sacct_state,
    sbatch,
    scancel,
    scontrol_job,
    slurm,
    squeue_jobs,
    start_cluster,
    stop_cluster,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]



def _own_hosts_lines(root: Path) -> list[str]:
    tag = f"  # lenstrain-devcluster {root}"
    return [line for line in Path("/etc/hosts").read_text().splitlines() if line.endswith(tag)]


def test_sbatch_wrap_completes(tmp_path: Path):
    out = tmp_path / "out.txt"
    jobid = sbatch("--chdir", str(tmp_path), "-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME")
    try:
        wait_for(lambda: sacct_state(jobid) == "COMPLETED", timeout=30, what=f"job {jobid} COMPLETED in sacct")
    finally:
        scancel(jobid)
    assert out.read_text().startswith("hello from n")


def test_srun_spans_two_nodes_with_resolvable_names(slurm_cluster):
    proc = slurm(
        "timeout", "60", "srun", "-N2", "-n4", "--ntasks-per-node=2", "bash", "-c",
        'echo "$SLURM_NODEID $SLURM_LOCALID $SLURM_PROCID $SLURMD_NODENAME $(getent hosts n1 | head -n1 | cut -d" " -f1)"',
        timeout=70,
    )
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == 4, proc.stdout
    assert {r[0] for r in rows} == {"0", "1"}
    assert sorted(r[1] for r in rows) == ["0", "0", "1", "1"]
    assert sorted(r[2] for r in rows) == ["0", "1", "2", "3"]
    assert {r[3] for r in rows} == {"n1", "n2"}
    assert {r[4] for r in rows} == {"127.0.0.11"}
    # MASTER_ADDR comes from the node list: the names must resolve here too.
    hostnames = slurm("scontrol", "show", "hostnames", "n[1-2]").stdout.split()
    assert hostnames == ["n1", "n2"]
    assert [socket.gethostbyname(h) for h in hostnames] == ["127.0.0.11", "127.0.0.12"]
    getent = subprocess.run(["getent", "hosts", "n2"], capture_output=True, text=True, timeout=10)
    assert getent.stdout.split()[0] == "127.0.0.12"


LOW_JOB = """#!/bin/bash
log={log}
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> "$log"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "done" >> "$log"; exit 0; fi
# What the training entry does: note the signal, save, then requeue itself and exit.
trap 'echo "signal USR2" >> "$log"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR2
echo "running" >> "$log"
while true; do sleep 0.2; done
"""


def test_preemption_signals_requeues_and_reruns(tmp_path: Path):
    log = tmp_path / "low.log"
    script = tmp_path / "low.sh"
    script.write_text(LOW_JOB.format(log=log))
    low = sbatch("-p", "debug", "-n1", "--requeue", "--signal=B:USR2@600", "--chdir", str(tmp_path),
                 "-o", str(tmp_path / "low-%j.out"), str(script))
    urgent = None
    try:
        wait_for(lambda: log.exists() and "running" in log.read_text(), timeout=30, what="low job running")
        # Needs every CPU of both nodes: only possible by preempting the low job.
        urgent = sbatch("-p", "urgent", "-N2", "--ntasks-per-node=2", "--chdir", str(tmp_path),
                        "-o", str(tmp_path / "urgent-%j.out"), "--wrap", "sleep 1")
        wait_for(lambda: "signal USR2" in log.read_text(), timeout=30, what="USR2 in the low job")
        wait_for(lambda: sacct_state(urgent) == "COMPLETED", timeout=30, what="urgent job COMPLETED")
        # cred_expire=10: the requeued job may start again ~11 s after the requeue.
        wait_for(lambda: sacct_state(low) == "COMPLETED", timeout=60, what="requeued low job COMPLETED")
    finally:
        scancel(*[j for j in (low, urgent) if j])
    assert log.read_text().split("\n") == ["start 0", "running", "signal USR2", "start 1", "done", ""]
    states = [r["state"] for r in sacct_records(low)]
    assert states[0] in ("REQUEUED", "PREEMPTED") and states[-1] == "COMPLETED", states
    assert int(scontrol_job(low).get("Restarts", "0")) >= 1


def test_status_env_and_idempotent_up(slurm_cluster, tmp_path: Path):
    status = devcluster("status", timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "slurmctld" in status.stdout and "idle" in status.stdout

    env = devcluster("env")
    assert env.returncode == 0
    assert env.stdout == f"export SLURM_CONF={slurm_cluster.conf}\n"

    t0 = time.monotonic()
    again = devcluster("up", timeout=60)
    assert again.returncode == 0 and "already up" in again.stdout
    assert time.monotonic() - t0 < 10

    # A root where nothing runs reports down, and `env` follows LENSTRAIN_DEVCLUSTER_DIR.
    other = {**os.environ, "LENSTRAIN_DEVCLUSTER_DIR": str(tmp_path / "none")}
    assert devcluster("status", env=other).returncode == 1
    assert devcluster("env", env=other).stdout == f"export SLURM_CONF={tmp_path / 'none'}/etc/slurm.conf\n"


def _daemon_pids(root: Path) -> list[int]:
    return [int(p.read_text()) for p in (root / "run").glob("*.pid") if p.read_text().strip().isdigit()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(") ")[2][:1] != "Z"  # a zombie has exited


def test_down_then_up_again(slurm_cluster):
    """Runs last in this file: takes the shared cluster down, checks, and brings it back."""
    assert not squeue_jobs()
    pids = _daemon_pids(slurm_cluster.root)
    assert len(pids) == 6
    down = stop_cluster()
    assert down.returncode == 0, down.stdout + down.stderr
    try:
        assert not [p for p in pids if _alive(p)]
        assert devcluster("status").returncode == 1
        assert _own_hosts_lines(slurm_cluster.root) == []
        assert devcluster("down").returncode == 0  # idempotent
    finally:
        start_cluster()
    assert devcluster("status").returncode == 0
    assert [line.split()[:2] for line in _own_hosts_lines(slurm_cluster.root)] == [
        ["127.0.0.11", "n1"], ["127.0.0.12", "n2"]]
    jobid = sbatch("--chdir", "/tmp", "-o", "/dev/null", "--wrap", "true")
    wait_for(lambda: sacct_state(jobid) == "COMPLETED", timeout=30, what="job after restart COMPLETED")
