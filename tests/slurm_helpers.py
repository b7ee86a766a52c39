"""Helpers for tests against the real single-machine SLURM cluster (``slurm/devcluster``).

Every call here is bounded by a timeout: with nodes down, ``srun`` and friends wait forever.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
DEVCLUSTER = REPO / "slurm" / "devcluster"
UP_TIMEOUT_S = 300  # a first `up` installs the Debian packages
DOWN_TIMEOUT_S = 90

T = TypeVar("T")


@dataclass(frozen=True)
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    up_output: str = field(default="", compare=False, repr=False)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}


def cluster_root() -> Path:
    return Path(os.environ.get("LENSTRAIN_DEVCLUSTER_DIR") or REPO / ".devcluster").resolve()


def devcluster(command: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``slurm/devcluster COMMAND``; never raises on a non-zero exit."""
    return subprocess.run([str(DEVCLUSTER), command], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def start_cluster(timeout: float = UP_TIMEOUT_S) -> SlurmCluster:
    """``devcluster up``; raises RuntimeError (with the script's output) when it fails."""
    try:
        proc = devcluster("up", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"slurm/devcluster up did not finish in {timeout:.0f} s:\n{_text(exc.stdout)}"
                           f"{_text(exc.stderr)}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"slurm/devcluster up failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    root = cluster_root()
    return SlurmCluster(root=root, conf=root / "etc" / "slurm.conf", up_output=proc.stdout)


def stop_cluster(timeout: float = DOWN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return devcluster("down", timeout=timeout)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def slurm(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """Run a SLURM client command (uses SLURM_CONF from the environment)."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def sbatch(*args: str, timeout: float = 30) -> str:
    """Submit with ``sbatch --parsable ARGS``; return the job id."""
    out = slurm("sbatch", "--parsable", *args, timeout=timeout).stdout.strip()
    return out.split(";")[0]


def sacct_records(jobid: str, duplicates: bool = True) -> list[dict[str, str]]:
    """Accounting records of the job allocation (no steps); with ``duplicates``, one per (re)start."""
    args = ["sacct", "-X", "-n", "--parsable2", "-o", "JobID,State,Partition,NodeList,ExitCode", "-j", jobid]
    if duplicates:
        args.append("--duplicates")
    proc = slurm(*args, check=False)
    keys = ("jobid", "state", "partition", "nodelist", "exitcode")
    records = []
    for line in proc.stdout.splitlines():
        if line.strip():
            record = dict(zip(keys, line.split("|"), strict=False))
            record["state"] = record.get("state", "").split(" ")[0]  # "CANCELLED by 0" -> "CANCELLED"
            records.append(record)
    return records


def sacct_state(jobid: str) -> str | None:
    """The job's current state as ``sacct`` reports it (e.g. COMPLETED), or None if not known yet."""
    records = sacct_records(jobid, duplicates=False)
    return records[-1]["state"] if records else None


def squeue_jobs() -> list[dict[str, str]]:
    """Jobs in the queue (pending, running, completing)."""
    proc = slurm("squeue", "-h", "-o", "%i|%T|%P|%j|%N", check=False)
    keys = ("jobid", "state", "partition", "name", "nodelist")
    return [dict(zip(keys, line.split("|"), strict=False)) for line in proc.stdout.splitlines() if line.strip()]


def scontrol_job(jobid: str) -> dict[str, str]:
    """``scontrol show job -o JOBID`` as a dict (empty once the controller forgot the job)."""
    proc = slurm("scontrol", "show", "job", "-o", jobid, check=False)
    fields: dict[str, str] = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def scancel(*jobids: str) -> None:
    if jobids:
        slurm("scancel", *jobids, check=False)


def task_pids(folder: str | Path, job_id: str) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the job's running submitit tasks (``python -m submitit.core._submit FOLDER``);
    every node of the devcluster runs on this machine, so /proc shows them all."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"submitit.core._submit" not in cmdline or str(folder).encode() not in cmdline:
                continue
            environ = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if environ.get(b"SLURM_JOB_ID") == job_id.encode() and b"SLURM_PROCID" in environ:
            found[int(environ[b"SLURM_PROCID"])] = int(proc.name)
    return found
