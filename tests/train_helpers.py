"""Shared helpers for training tests: a tiny real shard set and real `python -m lenstrain` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from shards.pack import TargetSpec, pack_shard_set
from shards.splits import stratified_split

ROOT = Path(__file__).resolve().parents[1]


class RingSample:
    """A ring whose radius encodes the target: learnable, cheap, deterministic."""

    def __init__(self, size: int = 32):
        self.size = size

    def __call__(self, i: int):
        rng = np.random.default_rng(i)
        y = float(rng.uniform(0, 1))
        yy, xx = np.mgrid[: self.size, : self.size]
        r = np.hypot(yy - self.size / 2, xx - self.size / 2)
        img = np.exp(-((r - 3 - self.size / 4 * y) ** 2) / 3) + 0.1 * rng.normal(size=(self.size, self.size))
        return img[None].astype(np.float32), {"y": y, "cls": int(y > 0.5)}


def make_ring_shards(out: Path, n: int = 120, shard_size: int = 25, size: int = 32) -> Path:
    fn = RingSample(size)
    y = np.array([fn(i)[1]["y"] for i in range(n)])
    split = stratified_split(y, val=0.15, test=0.15, seed=0, regression=True)
    pack_shard_set(out, sample_fn=fn, split_of=split,
                   targets=[TargetSpec("y", "regression"), TargetSpec("cls", "classification", ["low", "high"])],
                   primary_target="y", source={"kind": "rings"}, shard_size=shard_size)
    return out


def write_config(path: Path, shards: Path, **sections) -> Path:
    config = {
        "seed": 3,
        "data": {"shards": str(shards), "batch_size": 4, "workers": 0},
        "model": {"name": "alternet_tiny"},
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": {"max_steps": 12, "precision": "fp32", "deterministic": True},
        "checkpoint": {"every_steps": 4, "keep": 2, "every_minutes": None},
        "log": {"every_steps": 1, "images": False},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
    path.write_text(yaml.safe_dump(config))
    return path


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
    progress = run_dir / "progress.json"
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
