"""``launcher submit --local``: the same job and training entry on this machine, in the foreground."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from launcher import runs
from launcher.__main__ import main
from lenstrain.checkpoint import latest_complete, load_model_state, read_meta
from lenstrain.preemption import EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def final_weights(run_dir: Path) -> dict:
    return load_model_state(latest_complete(run_dir / "checkpoints", log=lambda m: None))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


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


def test_ctrl_c_checkpoints_and_the_same_command_resumes_exactly(capsys, launcher_job, tmp_path):
    job = launcher_job("sig", train={"max_steps": 24})
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "submit", job, "--local", "--nproc", "2", "--name", "straight",
                             "--runs-dir", runs_dir)
    assert code == 0, out + err

    cmd = [sys.executable, "-m", "launcher", "submit", str(job), "--local", "--nproc", "2", "--runs-dir", str(runs_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    progress = runs_dir / "sig" / "progress.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["step"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: passed to every rank as SIGTERM
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, out
    assert "passing SIGTERM to 2 rank(s)" in out
    stopped = latest_complete(runs_dir / "sig" / "checkpoints", log=lambda m: None)
    assert read_meta(stopped)["reason"] == "signal 15" and read_meta(stopped)["step"] < 24
    (job_record,) = runs.read_jobs(runs_dir / "sig")["jobs"]
    assert job_record["state"] == "STOPPED" and job_record["attempts"][0]["outcome"] == "stopped"

    code, out, err = run_cli(capsys, "submit", job, "--local", "--nproc", "2", "--runs-dir", runs_dir)
    assert code == 0, out + err
    assert f"resumes from {stopped.name}" in out
    assert_same_weights(final_weights(runs_dir / "straight"), final_weights(runs_dir / "sig"))
