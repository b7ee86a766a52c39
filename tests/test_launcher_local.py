"""``launcher submit --local``: the same job and training entry on this machine, in the foreground."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import main
from launcher.local import rank_alive
from lenstrain.checkpointing.checkpoint import latest_complete, read_meta
from lenstrain.run.preemption import EXIT_REQUEUE
from tests.factories import assert_same_weights, final_weights, launcher_job_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # the job of launcher_job_dict; it checkpoints every 10 steps


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.multiprocess
def test_local_run_resubmit_status_and_logs(capsys, launcher_job, tmp_path):
    job = launcher_job("loc", train={"max_steps": 8})
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "submit", job, "--local", "--nproc", "2", "--runs-dir", runs_dir)
    assert code == 0, out + err
    run_dir = runs_dir / "loc"
    (job_record,) = runs.read_jobs(run_dir)["jobs"]
    assert job_record["kind"] == "local" and job_record["state"] == "COMPLETED"
    assert job_record["attempts"][0]["world_size"] == 2 and job_record["attempts"][0]["step"] == 8
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "done"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "job.yaml").is_file() and (run_dir / "tb").is_dir()

    code, out, _ = run_cli(capsys, "logs", "loc", "--runs-dir", runs_dir)
    assert code == 0 and "[lenstrain] step 8/8" in out
    code, out, _ = run_cli(capsys, "status", "--runs-dir", runs_dir)
    row = next(line for line in out.splitlines() if "loc" in line)
    assert "COMPLETED" in row and "8/8" in row

    # The same job again is a resubmit of a finished run: nothing to do, nothing started.
    code, out, err = run_cli(capsys, "submit", job, "--local", "--nproc", "2", "--runs-dir", runs_dir)
    assert code == 0, out + err
    assert "is complete (step 8/8)" in out
    code, out, _ = run_cli(capsys, "resume", "loc", "--runs-dir", runs_dir)
    assert code == 0 and "is complete (step 8/8)" in out
    assert len(runs.read_jobs(run_dir)["jobs"]) == 1


@pytest.fixture(scope="module")
def reference(launcher_shards, tmp_path_factory) -> dict:
    """The final weights of the uninterrupted run (2 local ranks) that every interrupted run must match."""
    root = tmp_path_factory.mktemp("reference")
    job = root / "straight.yaml"
    job.write_text(yaml.safe_dump(launcher_job_dict(launcher_shards), sort_keys=False))
    assert main([str(a) for a in ("submit", job, "--local", "--nproc", "2", "--runs-dir", root / "runs")]) == 0
    return final_weights(root / "runs" / "straight")


def start_local(job: Path, runs_dir: Path) -> subprocess.Popen:
    """``launcher submit JOB --local --nproc 2`` as its own process, as a user starts it."""
    cmd = [sys.executable, "-m", "launcher", "submit", str(job), "--local", "--nproc", "2", "--runs-dir", str(runs_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((run_dir / "progress.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run did not reach step {step}:\n{proc.communicate()[0]}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.multiprocess
def test_ctrl_c_checkpoints_and_the_same_command_resumes_exactly(capsys, launcher_job, reference, tmp_path):
    job = launcher_job("sig")
    runs_dir = tmp_path / "runs"
    proc = start_local(job, runs_dir)
    wait_for_step(proc, runs_dir / "sig", 3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: passed to every rank as SIGTERM
    out = finish(proc)
    assert proc.returncode == EXIT_REQUEUE, out
    assert "passing SIGTERM to 2 rank(s)" in out
    stopped = latest_complete(runs_dir / "sig" / "checkpoints", log=lambda m: None)
    assert read_meta(stopped)["reason"] == "signal 15" and read_meta(stopped)["step"] < STEPS
    (job_record,) = runs.read_jobs(runs_dir / "sig")["jobs"]
    assert job_record["state"] == "STOPPED" and job_record["attempts"][0]["outcome"] == "stopped"

    code, out, err = run_cli(capsys, "submit", job, "--local", "--nproc", "2", "--runs-dir", runs_dir)
    assert code == 0, out + err
    assert f"resumes from {stopped.name}" in out
    assert_same_weights(reference, final_weights(runs_dir / "sig"))


@pytest.mark.multiprocess
def test_cancel_stops_a_local_run_after_a_checkpoint(capsys, launcher_job, tmp_path):
    job = launcher_job("stopme")
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "stopme"
    proc = start_local(job, runs_dir)
    wait_for_step(proc, run_dir, 3)
    (record,) = runs.read_jobs(run_dir)["jobs"]
    assert record["pid"] == proc.pid and len(record["rank_pids"]) == 2

    code, out, err = run_cli(capsys, "cancel", "stopme", "--runs-dir", runs_dir)
    launcher_out = finish(proc)
    assert code == 0, out + err
    assert f"stopped local job {record['job_id']}" in out
    assert f"python -m launcher resume {run_dir.resolve()} --local --nproc 2" in out
    assert proc.returncode == EXIT_REQUEUE, launcher_out
    assert not any(rank_alive(pid) for pid in record["rank_pids"])
    (record,) = runs.read_jobs(run_dir)["jobs"]
    assert record["state"] == "CANCELLED" and record["attempts"][0]["outcome"] == "cancelled"
    stopped = latest_complete(run_dir / "checkpoints", log=lambda m: None)
    assert read_meta(stopped)["reason"] == "signal 15"

    code, out, _ = run_cli(capsys, "status", "--runs-dir", runs_dir)
    assert "CANCELLED" in next(line for line in out.splitlines() if "stopme" in line)
    code, out, _ = run_cli(capsys, "cancel", "stopme", "--runs-dir", runs_dir)
    assert code == 0 and "has no active job" in out


@pytest.mark.multiprocess
def test_a_killed_rank_stops_the_others_and_the_printed_resume_finishes_exactly(capsys, launcher_job, reference,
                                                                                tmp_path):
    job = launcher_job("killed")
    runs_dir = tmp_path / "runs"
    run_dir = (runs_dir / "killed").resolve()
    proc = start_local(job, runs_dir)
    wait_for_step(proc, run_dir, 12)  # past the checkpoint at step 10
    (record,) = runs.read_jobs(run_dir)["jobs"]
    os.kill(record["rank_pids"][1], signal.SIGKILL)
    killed = time.monotonic()
    out = finish(proc, timeout=60)
    assert time.monotonic() - killed < 30, out
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert not any(rank_alive(pid) for pid in record["rank_pids"])

    newest = runs.newest_checkpoint(run_dir)
    assert newest is not None and read_meta(newest)["step"] >= 10
    resume = f"python -m launcher resume {run_dir} --local --nproc 2"
    summary = out.rstrip().splitlines()[-3:]  # the last thing shown, after every rank's output
    assert summary[0].startswith("[launcher] rank 1 was killed by SIGKILL"), out
    assert summary[1:] == [f"  newest complete checkpoint: {newest.name} ({newest})", f"  resume with: {resume}"], out
    (record,) = runs.read_jobs(run_dir)["jobs"]
    assert record["state"] == "FAILED" and record["attempts"][0]["outcome"] == "rank 1 was killed by SIGKILL"

    code, out, err = run_cli(capsys, *shlex.split(resume)[3:])
    assert code == 0, out + err
    assert f"resumes from {newest.name}" in out
    assert_same_weights(reference, final_weights(run_dir))


def test_a_local_job_whose_processes_are_all_gone_shows_as_lost(tmp_path):
    import socket

    from launcher.status import refresh_states

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no process holds any more
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "launcher"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        for job_id, pid in (("local-dead", gone.pid), ("local-alive", live.pid)):
            runs.add_job(run_dir, job_id, kind="local", state="RUNNING", host=socket.gethostname(), pid=pid,
                         rank_pids=[gone.pid])
        data, _ = refresh_states(run_dir)
        states = {job["job_id"]: job["state"] for job in data["jobs"]}
        # The launcher of "local-alive" still runs (its command line names the launcher): not lost.
        assert states == {"local-dead": "LOST", "local-alive": "RUNNING"}
        assert runs.read_jobs(run_dir)["jobs"][0]["state"] == "LOST"
    finally:
        live.kill()
        live.wait()
