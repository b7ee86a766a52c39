"""Real `python -m lenstrain` runs for training tests: one to the end, or one stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lenstrain.checkpointing.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def lenstrain(*args, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lenstrain", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"lenstrain {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def signal_at_step(cmd: list[str], run_dir: Path, at_step: int, sig: int, timeout: float = 300) -> tuple[int, str]:
    """Start ``cmd``, send it ``sig`` once the run's progress.json reaches ``at_step``, and wait for the exit.
    Returns the exit status and the output (stdout and stderr together)."""
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), cwd=ROOT)
    deadline = time.monotonic() + timeout
    progress = RunDir(run_dir).progress
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["step"] >= at_step:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def train_until_signalled(config: Path, run_dir: Path, at_step: int, nproc: int = 1, timeout: float = 300):
    """``lenstrain train``, stopped by SIGUSR2 (a scheduler's preemption warning) at ``at_step``."""
    cmd = [sys.executable, "-m", "lenstrain", "train", config, "--run-dir", run_dir, "--nproc", nproc]
    return signal_at_step(cmd, run_dir, at_step, signal.SIGUSR2, timeout)
