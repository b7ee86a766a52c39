"""The README's tour, command by command, in order, in an empty directory that holds only the repository's
jobs/: as a newcomer on a fresh clone would run it, with small sizes substituted. Commands that need a
cluster or never end are handled in NOT_AS_WRITTEN, each with its reason; every other command runs as
written and must exit 0, so a tour command that stops working fails this test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SMALL_SIZES = [  # (pattern, replacement) on each command's text
    (r"--n \d+", "--n 60"),
    (r"--workers \d+", "--workers 1"),
    (r"train\.max_steps=\d+", "train.max_steps=4"),
    (r"/path/to/Model_I\b", "Model_I"),
    (r"^(python -m lenstrain lr-find (?:(?!--steps).)*)$", r"\1 --steps 8"),
]
# Appended to each local training run: the flagship's batch of 64 per rank exceeds the small shard set, and
# data-loading processes only slow a 4-step run on a small machine.
LOCAL_TRAINING = " --set data.batch_size=8 --set data.workers=0"


@dataclass(frozen=True)
class NotAsWritten:
    pattern: str  # matched against the command as the README writes it
    reason: str
    skip: bool = False
    append: str = ""
    drop: str = ""


NOT_AS_WRITTEN = [
    NotAsWritten(r"^python -m launcher submit (?!.*--local)(?!.*--dry-run)",
                 "submits to SLURM; here the README's local smoke test of it, so that resume, eval and predict "
                 "find its run", append=" --local --set model.name=alternet_tiny --set train.max_steps=30"),
    NotAsWritten(r"^python -m launcher logs .*--follow", "follows the log until the job ends", drop=" --follow"),
    NotAsWritten(r"^tensorboard ", "a server that runs until it is stopped", skip=True),
    NotAsWritten(r"^python -m launcher resume ",
                 "submits to SLURM; --local resumes the run here (it is complete: nothing to do, exit 0)",
                 append=" --local"),
]


def tour_commands(readme: Path) -> list[str]:
    """The shell commands of the README's ``## A tour`` code blocks, comments dropped, in order."""
    section = readme.read_text().split("\n## A tour\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands += [" ".join(shlex.split(line, comments=True)) for line in block.splitlines()]
    return [c for c in commands if c]


def as_run_here(command: str) -> str | None:
    """The command with small sizes and its NOT_AS_WRITTEN action applied; None if it is skipped."""
    rows = [row for row in NOT_AS_WRITTEN if re.search(row.pattern, command)]
    assert len(rows) <= 1, f"{command!r} matches several rows of NOT_AS_WRITTEN"
    if rows and rows[0].skip:
        return None
    if rows:
        command = command.replace(rows[0].drop, "") if rows[0].drop else command
        command += rows[0].append
    for pattern, replacement in SMALL_SIZES:
        command = re.sub(pattern, replacement, command)
    if command.startswith("python -m launcher submit ") and " --local" in command:
        command += LOCAL_TRAINING
    return command


def make_inputs(here: Path) -> None:
    """What the tour's import lines read: a DeepLense-style Model_I/ ([image, value] object arrays in the
    axion/ class, plain images elsewhere) and plain arrays X.npy with their labels y.csv."""
    rng = np.random.default_rng(0)
    for name in ("axion", "cdm", "no_sub"):
        (here / "Model_I" / name).mkdir(parents=True)
        for i in range(6):
            image = rng.random((150, 150)).astype(np.float32)
            stored = np.array([image, 1e-23], dtype=object) if name == "axion" else image
            np.save(here / "Model_I" / name / f"{name}_sim_{i}.npy", stored, allow_pickle=True)
    np.save(here / "X.npy", rng.random((30, 1, 32, 32)).astype(np.float32))
    (here / "y.csv").write_text("mass\n" + "\n".join(f"{v:.4f}" for v in rng.random(30)) + "\n")


def run_here(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_CONF": "/nonexistent/slurm.conf",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_tour_is_read_from_the_readme():
    commands = tour_commands(README)
    assert commands[0].startswith("python -m shards simulate ") and len(commands) >= 10, commands
    assert not any("devcluster" in c for c in commands), "the devcluster subsection is not part of the tour"
    for row in NOT_AS_WRITTEN:  # a row that matches nothing is stale
        assert any(re.search(row.pattern, c) for c in commands), row


@pytest.mark.slow
@pytest.mark.timeout(1200)  # some twenty commands, each a fresh process with its imports
def test_every_tour_command_works_in_order_on_a_fresh_clone(tmp_path):
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    make_inputs(tmp_path)
    for command in tour_commands(README):
        here = as_run_here(command)
        if here is None:
            print(f"skipped: {command}")
            continue
        start = time.monotonic()
        proc = run_here(here, tmp_path)
        print(f"{time.monotonic() - start:6.1f}s  {here}")
        assert proc.returncode == 0, (
            f"README tour: `{command}` (run as `{here}`) exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
