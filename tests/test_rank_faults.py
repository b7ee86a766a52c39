"""Dead and hung ranks: the collective timeout (``parallel.timeout_s``), NCCL's watchdog variables, and
the requeue decision after a failed SLURM step. The same faults on the real devcluster are in
``test_launcher_slurm.py`` (a killed task, a stopped rank)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from launcher import runs
from launcher.recovery import EXIT_RANK_LOST, collective_failure, decision, describe_failure
from lenstrain.config.schema import LenstrainConfig
from lenstrain.parallel.distributed import nccl_watchdog_env
from tests.factories import config_dict, launcher_job_dict

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the timeout and NCCL


def test_timeout_s_defaults_to_600_and_must_be_positive(ring_shards):
    assert LenstrainConfig.model_validate(config_dict(ring_shards)).parallel.timeout_s == 600
    with pytest.raises(ValueError, match="parallel.timeout_s"):
        LenstrainConfig.model_validate(config_dict(ring_shards, parallel={"timeout_s": 0}))


def test_nccl_watchdog_variables_a_gpu_rank_gets(tmp_path):
    # CUDA and NCCL cannot run on this machine (no GPU): this checks the variables that init_distributed
    # puts into the environment before it creates an NCCL process group; NCCL itself reads them.
    logs = tmp_path / "logs"
    assert nccl_watchdog_env(20, logs, environ={}) == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "20",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{logs}/nccl_trace_rank_",
    }
    # What the user set stays theirs; a fractional timeout rounds up.
    users = {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    env = nccl_watchdog_env(0.5, None, environ=users)
    assert not set(users) & set(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in env
    assert nccl_watchdog_env(0.5, None, environ={})["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "1"


def test_a_lost_peer_is_told_from_other_errors():
    gloo_timeout = "[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation"
    assert collective_failure(RuntimeError(gloo_timeout))
    assert collective_failure(RuntimeError("[/x/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1"))
    assert collective_failure(RuntimeError("Application timeout caused pair closure"))  # from DDP's broadcast
    assert collective_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not collective_failure(RuntimeError("CUDA out of memory"))
    assert not collective_failure(ValueError("Timed out waiting"))  # not a collective's error type
    assert describe_failure(RuntimeError(gloo_timeout)) == (
        "RuntimeError: Timed out waiting 20000ms for recv operation")


# ------------------------------------------------------------------------- the decision on SLURM


def job_with(attempt: dict | None = None, failures: tuple = (), **extra) -> dict:
    return {"job_id": "7", "attempts": [attempt] if attempt else [], "failures": list(failures), **extra}


LOST = {"restart_count": 0, "rank": 0, "exit": EXIT_RANK_LOST, "why": "peer gone", "transient": True}
CASES = {
    "a lost rank is requeued": (job_with({"restart_count": 0}, [LOST]), "RUNNING", 0, "requeue"),
    "a task killed without a word is requeued": (job_with({"restart_count": 0}), "RUNNING", 0, "requeue"),
    "a rank 0 that never started is requeued": (job_with(), "RUNNING", 0, "requeue"),
    "within the run's max_requeues only": (job_with({"restart_count": 0}, [LOST]), "RUNNING", 3, "requeue-limit"),
    "rank 0 decided already (signal)": (job_with({"restart_count": 0, "ended": 1.0}), "RUNNING", 0, "decided"),
    "an error is permanent": (job_with({"restart_count": 0}, [LOST, {**LOST, "rank": 1, "transient": False}]),
                              "RUNNING", 0, "failed"),
    "an older attempt's error does not count": (job_with({"restart_count": 1}, [{**LOST, "transient": False}]),
                                                "RUNNING", 0, "requeue"),
    "a cancel is not undone": (job_with({"restart_count": 0}, cancel_requested=1.0), "RUNNING", 0, "cancelled"),
    "SLURM is taking it down": (job_with({"restart_count": 0}), "COMPLETING", 0, "slurm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_batch_step_requeues_only_a_transient_loss(case):
    job, state, requeues, expected = CASES[case]
    restart = job["attempts"][0]["restart_count"] if job["attempts"] else 0
    assert decision(job, restart, state, max_requeues=3, requeues=requeues) == expected


# ------------------------------------------------------------------------------------ locally


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        progress = runs.read_progress(run_dir) or {}
        if progress.get("step", 0) >= step:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"step {step} not reached:\n{proc.communicate()[0]}")


@pytest.mark.multiprocess
def test_a_hung_local_rank_ends_the_run_by_the_collective_timeout(ring_shards, tmp_path):
    job = tmp_path / "hung.yaml"
    sections = {"train": {"max_steps": 400}, "parallel": {"timeout_s": 5}}
    job.write_text(yaml.safe_dump(launcher_job_dict(ring_shards, **sections), sort_keys=False))
    runs_dir = tmp_path / "runs"
    run_dir = (runs_dir / "hung").resolve()
    cmd = [sys.executable, "-m", "launcher", "submit", str(job), "--local", "--nproc", "2", "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for_step(proc, run_dir, 3)
    (record,) = runs.read_jobs(run_dir)["jobs"]
    os.kill(record["rank_pids"][1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    waited = time.monotonic() - stopped
    assert 4 < waited < 30, out  # 5 s of timeout and the launcher's grace, not the 10 min default
    summary = out.rstrip().splitlines()[-3:]
    from shards.exitcodes import MEANINGS

    assert summary[0].startswith(f"[launcher] rank 0 exited with status {EXIT_RANK_LOST} ({MEANINGS[EXIT_RANK_LOST]}); "
                                 "stopped 1 other rank(s)"), out
    assert summary[2].startswith("  resume with: python -m launcher resume"), out
    assert proc.returncode == EXIT_RANK_LOST
    (record,) = runs.read_jobs(run_dir)["jobs"]
    # gloo words a timeout in several ways ("Timed out waiting 5000ms", "wait timeout after 5000ms",
    # "Application timeout caused pair closure"), by which collective or store call was waiting
    timed_out = re.compile(r"time(d)?\s?out", re.IGNORECASE)
    assert any(f["rank"] == 0 and f["transient"] and timed_out.search(f["why"]) for f in record["failures"]), \
        record["failures"]


def test_a_jobs_master_port_is_agreed_from_its_id_and_outside_the_ephemeral_range(monkeypatch):
    from lenstrain.parallel.distributed import env_from_slurm, master_port_for_job

    low, high = 32768, 60999  # Linux's default ip_local_port_range
    ports = {master_port_for_job(job_id) for job_id in range(65238500, 65238500 + 5000)}
    assert len(ports) == 4500 and all(not low <= port <= high and port < 65536 for port in ports), (low, high)
    assert master_port_for_job("65238512_3") == master_port_for_job(65238512)  # array tasks share their job's
    monkeypatch.setattr("lenstrain.parallel.distributed.first_host", lambda nodelist: "n1")
    task = {"SLURM_JOB_ID": "65238512", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
            "SLURM_JOB_NODELIST": "n[1-2]"}
    assert env_from_slurm(task)["MASTER_PORT"] == str(master_port_for_job(65238512))
    assert env_from_slurm({**task, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
