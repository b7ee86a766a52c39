"""A run directory as the launcher sees it, and its ``jobs.json``.

Every file name of a run comes from :mod:`lenstrain.checkpointing.rundir`. The launcher writes ``job.yaml`` (the
resolved job) and ``config.yaml`` (its training sections, what every task trains from) once per
submission; ``jobs.json`` lists every job (SLURM or local) that served the run: id, state, requeues
and attempts. ``jobs.json`` is updated by the launcher (submit, status, cancel) and by global rank 0
inside the job, so every change is a locked read-modify-write followed by an atomic replace.

The run lock (:func:`run_lock`, ``RUN/.jobs.json.lock``) is held for every such change, and by ``submit`` and
``resume`` from the check of the run directory to the new job's record. A run whose ``job.yaml`` or
``jobs.json`` cannot be read is a :class:`BrokenRunError` (exit 1) for the commands that read it; a corrupt
``jobs.json`` met while recording is moved aside with a warning, never emptied.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from launcher.lifecycle.conflict import RunConflict as RunConflict  # raised by check_run
from launcher.lifecycle.conflict import holds_same
from launcher.lifecycle.lock import exclusive
from lenstrain.checkpointing.rundir import JOB_FILE, JOBS_FILE, RunDir, write_atomic, write_json_atomic
from lenstrain.config.schema import ConfigError, LenstrainConfig

DEFAULT_RUNS_DIR = Path("runs")

# SLURM states in which a job still holds or waits for resources.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
}


class BrokenRunError(ValueError):
    """A run directory whose own files cannot be read (``job.yaml``, ``jobs.json``): exit 1, naming the file."""


def run_dir_for(name: str, run_dir: str | Path | None = None, runs_dir: str | Path | None = None) -> Path:
    if run_dir is not None:
        return Path(run_dir).resolve()
    return (Path(runs_dir or DEFAULT_RUNS_DIR) / name).resolve()


def find_run(ref: str, runs_dir: str | Path | None = None) -> Path:
    """A run given by name (under ``runs_dir``) or by the path of its directory."""
    candidates = [Path(runs_dir or DEFAULT_RUNS_DIR) / ref, Path(ref)]
    for path in candidates:
        if (path / JOB_FILE).is_file():
            return path.resolve()
    known = ", ".join(p.name for p in list_runs(runs_dir)) or "none"
    raise ConfigError(f"no run {ref!r} (looked for {candidates[0]}/{JOB_FILE}); runs: {known}")


def list_runs(runs_dir: str | Path | None = None) -> list[Path]:
    root = Path(runs_dir or DEFAULT_RUNS_DIR)
    if not root.is_dir():
        return []
    return sorted(p.resolve() for p in root.iterdir() if (p / JOB_FILE).is_file())


def read_job_dict(run_dir: Path) -> dict:
    """The run's ``job.yaml``; :class:`BrokenRunError` naming it when it is unreadable or not a mapping."""
    path = RunDir(run_dir).job
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # ValueError: bad UTF-8
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokenRunError(f"{path}: cannot be read ({first})") from None
    if not isinstance(data, dict):
        raise BrokenRunError(f"{path}: not a mapping of sections (found {type(data).__name__})")
    return data


def check_run(run_dir: Path, spec) -> str:
    """``"new"`` or ``"resubmit"`` for ``spec`` in ``run_dir``; :class:`RunConflict` if it holds another run.

    A directory that already holds a run with the same resolved training config is a resubmit: the
    job resumes from the newest checkpoint there. A different config is refused, because its
    checkpoints would be resumed by the wrong job. (Resources may change: more time, other nodes.)
    """
    run_dir = Path(run_dir)

    def difference() -> str | None:
        previous = _recorded_training(run_dir)
        training = spec.training_dict()
        if previous == training:
            return None
        diff = _diff(previous or {}, training)
        return (f"{run_dir} holds a different run ({'; '.join(diff[:6]) or 'unreadable ' + JOB_FILE}).\n"
                f"  Training keys of a run are fixed (resources.* may change on resume). Train this config as a new "
                f"run with `python -m launcher submit JOB.yaml --name NEW_NAME`, or continue that run as it was "
                f"with `python -m launcher resume {run_dir.name}`.")

    return "resubmit" if holds_same(run_dir, JOB_FILE, difference, "run") else "new"


def _recorded_training(run_dir: Path) -> dict | None:
    """The training sections of the job recorded in ``run_dir``; None when it cannot be read or validated (then
    it counts as a different run)."""
    from pydantic import ValidationError

    from launcher.spec import JobSpec

    try:
        return JobSpec.model_validate(read_job_dict(run_dir)).training_dict()
    except (BrokenRunError, ValidationError, ConfigError):
        return None


def write_run(run_dir: Path, spec) -> None:
    """Write the resolved job and its training config (``config.yaml``, read by every task) into ``run_dir``."""
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_atomic(run.job, spec.to_yaml())
    write_atomic(run.config, spec.config_yaml())


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def load_training_config(run_dir: Path) -> LenstrainConfig:
    """The run's training config, as the launcher wrote it to ``config.yaml``."""
    from lenstrain.config.schema import load_config

    return load_config(RunDir(run_dir).config)


# ----------------------------------------------------------------------------------- jobs.json


def run_lock(run_dir: Path):
    """The run's lock (``RUN/.jobs.json.lock``, :func:`launcher.lifecycle.lock.exclusive`): every change of
    ``jobs.json`` holds it, and ``submit``/``resume`` hold it from the run's check to the job's record. Creates
    the run directory."""
    return exclusive(Path(run_dir) / f".{JOBS_FILE}.lock")


def _jobs_problem(data) -> str | None:
    """How a parsed ``jobs.json`` departs from its shape: ``{"run": ..., "jobs": [{"job_id": "...", ...}]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        return "not an object with a list of jobs"
    for k, job in enumerate(data["jobs"]):
        if not isinstance(job, dict) or not isinstance(job.get("job_id"), str):
            return f"jobs[{k}] is not a job with a job_id"
        if not isinstance(job.get("attempts", []), list) or not all(isinstance(a, dict) for a in job.get("attempts", [])):
            return f"jobs[{k}].attempts is not a list of attempts"
        if not isinstance(job.get("failures", []), list):
            return f"jobs[{k}].failures is not a list"
        for name in ("requeues",):
            value = job.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"jobs[{k}].{name} is not an integer"
    return None


def _load_jobs(run_dir: Path) -> tuple[dict | None, str | None]:
    """jobs.json's content (a fresh one when there is none), or None and why it cannot be used."""
    path = RunDir(run_dir).jobs
    if not path.is_file():
        return {"run": Path(run_dir).name, "jobs": []}, None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({exc})"
    problem = _jobs_problem(data)
    return (None, problem) if problem else (data, None)


def read_jobs(run_dir: Path, *, set_aside: bool = False) -> dict:
    """The run's ``jobs.json``; :class:`BrokenRunError` naming it when it is corrupt (nothing is changed). With
    ``set_aside`` (inside a job, which must go on), a corrupt one is moved aside with a warning instead."""
    data, problem = _load_jobs(run_dir)
    if problem is not None and set_aside:
        return update_jobs(run_dir, lambda data: None)
    if problem is not None:
        path = RunDir(run_dir).jobs
        raise BrokenRunError(f"{path}: {problem}; it holds the run's job history: repair it, or move it aside "
                             f"(mv {path} {path}.bad) to start a new history")
    return data


def _set_aside(run_dir: Path, problem: str) -> dict:
    """Move a corrupt ``jobs.json`` aside (under the run lock), with a warning; a new history starts."""
    path = RunDir(run_dir).jobs
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    print(f"warning: {path}: {problem}; moved it aside to {aside} and started a new job history",
          file=sys.stderr, flush=True)
    return {"run": Path(run_dir).name, "jobs": []}


def update_jobs(run_dir: Path, change: Callable[[dict], Any]) -> dict:
    """Apply ``change`` to jobs.json under the run's lock; returns the new content. A corrupt jobs.json is moved
    aside with a warning first, never overwritten."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        data, problem = _load_jobs(run_dir)
        if problem is not None:
            data = _set_aside(run_dir, problem)
        change(data)
        write_json_atomic(RunDir(run_dir).jobs, data)
        return data


def find_job(data: dict, job_id: str) -> dict | None:
    for job in data["jobs"]:
        if job["job_id"] == str(job_id):
            return job
    return None


def add_job(run_dir: Path, job_id: str, **info: Any) -> None:
    record = {
        "job_id": str(job_id),
        "submitted": time.time(),
        "state": "PENDING",
        "requeues": 0,
        "attempts": [],
        **info,
    }
    update_jobs(run_dir, lambda data: data["jobs"].append(record))


def _job(data: dict, job_id: str) -> dict:
    job = find_job(data, job_id)
    if job is None:  # a job submitted by other means: adopt it
        job = {"job_id": str(job_id), "submitted": None, "state": "PENDING", "requeues": 0, "attempts": [], "kind": "slurm"}
        data["jobs"].append(job)
    return job


def record_start(run_dir: Path, job_id: str, *, restart_count: int, **info: Any) -> None:
    def change(data: dict) -> None:
        job = _job(data, job_id)
        job["state"] = "RUNNING"
        job["requeues"] = max(job.get("requeues", 0), restart_count)
        if job["attempts"] and "outcome" not in job["attempts"][-1]:
            # The attempt before ended without a word (its node failed, or it was killed outright), and
            # SLURM requeued the job.
            job["attempts"][-1]["outcome"] = "lost"
        job["attempts"].append({"restart_count": restart_count, "started": time.time(), **info})

    update_jobs(run_dir, change)


def record_end(run_dir: Path, job_id: str, *, state: str, outcome: str, **info: Any) -> None:
    def change(data: dict) -> None:
        job = _job(data, job_id)
        job["state"] = state
        if job["attempts"]:
            job["attempts"][-1].update({"ended": time.time(), "outcome": outcome, **info})

    update_jobs(run_dir, change)


def record_failure(run_dir: Path, job_id: str, restart_count: int, *, rank: int, exit: int, why: str,
                   transient: bool = False) -> None:
    """Note why one rank of an attempt stopped (``transient``: a lost peer, the job may be requeued)."""
    def change(data: dict) -> None:
        _job(data, job_id).setdefault("failures", []).append(
            {"restart_count": restart_count, "rank": rank, "exit": exit, "why": why, "transient": transient,
             "time": time.time()})

    update_jobs(run_dir, change)


def set_requeues(run_dir: Path, job_id: str, count: int) -> None:
    def change(data: dict) -> None:
        job = _job(data, job_id)
        job["requeues"] = max(job.get("requeues", 0), count)

    update_jobs(run_dir, change)


def set_states(run_dir: Path, states: dict[str, str]) -> None:
    """Record the states read from sacct (only for jobs of this run)."""

    def change(data: dict) -> None:
        for job in data["jobs"]:
            new = states.get(job["job_id"])
            if new and job.get("state") != new:
                job["state"] = new

    update_jobs(run_dir, change)


def active_jobs(data: dict) -> list[dict]:
    return [j for j in data["jobs"] if j.get("kind", "slurm") == "slurm" and j.get("state") in ACTIVE_STATES]


def run_requeues(data: dict) -> int:
    """Requeues of the whole run: every job's, across resumes."""
    return sum(j.get("requeues", 0) for j in data["jobs"])


def read_progress(run_dir: Path) -> dict | None:
    path = RunDir(run_dir).progress
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint with its ``COMPLETE`` marker: where a resume starts."""
    from lenstrain.checkpointing.checkpoint import COMPLETE, list_checkpoints

    found = [p for _, p in list_checkpoints(RunDir(run_dir).checkpoints) if (p / COMPLETE).is_file()]
    return found[-1] if found else None


def display_path(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_ref(run_dir: Path) -> str:
    """How ``launcher resume``/``status`` find this run from here without ``--runs-dir``: its name when
    it lies in ``runs/``, else its path."""
    run_dir = Path(run_dir).resolve()
    if run_dir == run_dir_for(run_dir.name):
        return run_dir.name
    return display_path(run_dir)
