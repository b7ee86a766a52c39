"""A lost rank on SLURM: the batch step decides whether the job is requeued.

Every task runs under ``srun --kill-on-bad-exit=1``: when one task dies (a signal, an error) SLURM
stops the others at once. A rank whose collective fails because a peer died or hung (gloo raises
after ``parallel.timeout_s``, or at once on a closed connection; NCCL's watchdog aborts the process)
exits :data:`EXIT_RANK_LOST` and notes why in ``jobs.json``. Any other error is noted as permanent.

The decision cannot live in a task: the task that would make it may be the one that died. It lives
in the batch script, after ``srun`` returns (submitit's ``teardown`` lines, see
:func:`launcher.slurm.teardown_lines`), which runs ``python -m launcher.recovery`` when the step
failed. That requeues the job (``scontrol requeue``), within the run's ``resources.max_requeues``,
unless the attempt was already decided inside the job (a collective checkpoint after a signal: rank
0 requeued it), a rank noted a permanent failure (an error, a non-finite loss, a checkpoint that
could not be written), the job is being cancelled, or SLURM is taking it down itself. A lost batch
node ends the job as NODE_FAIL, and SLURM requeues it by itself (the job is submitted ``--requeue``).
The requeued job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from launcher import runs
from launcher.lifecycle.decide import decision as decision  # the decision itself, for runs and sweeps
from launcher.lifecycle.decide import failures_of, record_outcome, requeue_job, slurm_state
from launcher.sweep.paths import is_sweep
from shards.exitcodes import EXIT_RANK_LOST as EXIT_RANK_LOST  # the table with its meaning: shards.exitcodes

# Messages of gloo's transport when a peer is gone or silent (gloo raises a plain RuntimeError).
_GLOO_PEER_LOST = ("/gloo/transport/", "Connection closed by peer", "Connection reset by peer",
                   "Timed out waiting", "Application timeout caused pair closure")


_SOURCE_PREFIX = re.compile(r"^\[[^]]*\.(cc|cpp|h):\d+\]\s*")


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died or did not answer."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _GLOO_PEER_LOST)


def describe_failure(exc: BaseException) -> str:
    """The exception's type and first sentence, without gloo's ``[/path/to/source.cc:78]`` prefix."""
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {_SOURCE_PREFIX.sub('', first)[:200]}"


_NOT_REQUEUED = {"failed": "a rank failed for good, see above", "cancelled": "the job is being cancelled", "slurm": ""}


def _say(message: str) -> None:
    print(f"[launcher] {time.strftime('%H:%M:%S')} {message}", flush=True)


def _why(job: dict, restart: int, status: int) -> str:
    notes = [f"rank {f['rank']}: {f['why']}" for f in failures_of(job, restart)]
    return f"the job step ended with status {status}" + (f" ({'; '.join(notes)})" if notes else
                                                           " (a task was killed or lost)")


def recover(run_dir: Path, name: str, max_requeues: int, status: int) -> str:
    """Decide about the current attempt of this SLURM job after its step failed; returns the decision."""
    job_id = os.environ.get("LENSTRAIN_JOB_ID") or os.environ["SLURM_JOB_ID"]  # a --seeds array task: ARRAY_i
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    data = runs.read_jobs(run_dir, set_aside=True)
    job = runs.find_job(data, job_id) or {}
    state = slurm_state(job_id)
    requeues = max(runs.run_requeues(data), restart)
    what = decision(job, restart, state, max_requeues, requeues)
    why = _why(job, restart, status)
    newest = runs.newest_checkpoint(run_dir)
    resumes = f"resumes from {newest.name}" if newest else "starts again from step 0 (no complete checkpoint)"
    if what == "requeue-limit":
        _say(f"{why}; run {name} has been requeued {requeues} times (resources.max_requeues={max_requeues}); not "
             f"requeueing. Continue with `python -m launcher resume {name} --set resources.max_requeues="
             f"{requeues + 1}`; it {resumes}")
        record_outcome(run_dir, job_id, restart, "FAILED", "requeue-limit", exit=status)
    elif what == "requeue":
        _say(f"{why}: a lost rank is transient; requeueing job {job_id} (requeue {requeues + 1} of the run's at "
             f"most {max_requeues}); it {resumes}")
        record_outcome(run_dir, job_id, restart, "REQUEUED", "requeued", exit=status)
        refused = requeue_job(job_id)
        if refused:
            _say(f"scontrol requeue {job_id} failed: {refused}")
            record_outcome(run_dir, job_id, restart, "FAILED", "requeue-failed", exit=status)
            return "requeue-failed"
    elif what in _NOT_REQUEUED:
        _say(f"{why}; not requeueing ({_NOT_REQUEUED[what] or f'SLURM has the job {state}'})")
        if what in ("failed", "cancelled"):
            record_outcome(run_dir, job_id, restart, what.upper(), what, exit=status)
    return what


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.recovery DIR --status S``, from the batch script after a failed ``srun``: DIR is a
    run (``--name`` and ``--max-requeues`` default to its own) or a sweep (its array task's trial is failed
    and retried, see :mod:`launcher.sweep.recover`). Always exits 0: the script exits with ``srun``'s status."""
    parser = argparse.ArgumentParser(prog="python -m launcher.recovery")
    parser.add_argument("run_dir", type=Path, help="the run's (or the sweep's) directory")
    parser.add_argument("--name", help="the run's name (default: its directory's)")
    parser.add_argument("--max-requeues", type=int, help="default: the run's resources.max_requeues")
    parser.add_argument("--status", type=int, required=True, help="srun's exit status")
    args = parser.parse_args(argv)
    try:
        if is_sweep(args.run_dir):
            from launcher.sweep.recover import recover as recover_sweep

            recover_sweep(args.run_dir, args.status)
        else:
            limit = args.max_requeues
            if limit is None:
                limit = runs.read_job_dict(args.run_dir)["resources"]["max_requeues"]
            recover(args.run_dir, args.name or args.run_dir.name, limit, args.status)
    except Exception as exc:  # noqa: BLE001 - the script still exits with srun's status
        _say(f"could not decide about a requeue: {describe_failure(exc)}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
