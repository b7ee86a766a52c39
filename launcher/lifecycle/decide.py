"""The batch step's decision after a failed ``srun``, for a run's job or a sweep's array task alike.

Every task runs under ``srun --kill-on-bad-exit=1``: when one dies, SLURM stops the others, and the batch
script (its teardown lines) runs ``python -m launcher.recovery``, which asks :func:`decision` about the
attempt that just failed, records the outcome in the run's ``jobs.json`` and requeues the job when it should.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from launcher import runs


def attempt_of(job: dict, restart: int) -> dict | None:
    return next((a for a in reversed(job.get("attempts", [])) if a.get("restart_count") == restart), None)


def failures_of(job: dict, restart: int) -> list[dict]:
    return [f for f in job.get("failures", []) if f.get("restart_count") == restart]


def decision(job: dict, restart: int, state: str | None, max_requeues: int, requeues: int) -> str:
    """What to do with a job whose step failed: ``decided`` (inside the job already), ``failed``
    (a permanent failure), ``cancelled``, ``slurm`` (SLURM is taking it down or requeueing it),
    ``requeue-limit`` or ``requeue``."""
    attempt = attempt_of(job, restart)
    if attempt is not None and "ended" in attempt:
        return "decided"
    if any(not f.get("transient") for f in failures_of(job, restart)):
        return "failed"
    if job.get("cancel_requested") or state == "CANCELLED":
        return "cancelled"
    if state != "RUNNING":
        return "slurm"
    return "requeue-limit" if requeues >= max_requeues else "requeue"


def slurm_state(job_id: str) -> str:
    """The job's state as the controller has it now (``UNKNOWN`` when it does not answer)."""
    from launcher.slurm import squeue_state

    return (squeue_state(job_id) or "UNKNOWN").split()[0]


def requeue_job(job_id: str) -> str | None:
    """``scontrol requeue JOB``; None when it worked, else what ``scontrol`` said."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no scontrol here, or a controller that does not answer
        return f"{type(exc).__name__}: {exc}"
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip() or f"status {done.returncode}"


def record_outcome(run_dir: Path, job_id: str, restart: int, state: str, outcome: str, **info) -> None:
    """End the attempt ``restart`` of the job (created here when its rank 0 never started)."""
    def change(data: dict) -> None:
        job = runs.find_job(data, job_id)
        if job is None:
            job = {"job_id": job_id, "state": state, "requeues": 0, "attempts": [], "kind": "slurm"}
            data["jobs"].append(job)
        attempt = attempt_of(job, restart)
        if attempt is None:
            attempt = {"restart_count": restart, "started": None}
            job["attempts"].append(attempt)
        job["state"] = state
        attempt.update({"ended": time.time(), "outcome": outcome, **info})
        if outcome == "requeued":
            job["requeues"] = max(job.get("requeues", 0), restart + 1)

    runs.update_jobs(run_dir, change)
