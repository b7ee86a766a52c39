"""Real `python -m lenstrain` runs for training tests: one to the end, or one stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lenstrain.rundir import RunDir
from tests.factories import make_ring_shards, write_config  # noqa: F401  (until every module imports factories)

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


def train_until_signalled(config: Path, run_dir: Path, at_step: int, nproc: int = 1, timeout: float = 300):
    """Start training, send SIGUSR2 once progress.json reaches ``at_step``, and wait for the exit."""
    cmd = [sys.executable, "-m", "lenstrain", "train", str(config), "--run-dir", str(run_dir), "--nproc", str(nproc)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
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
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out
