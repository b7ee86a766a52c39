"""A sweep's array task after its step failed (``python -m launcher.recovery SWEEP_DIR --status S``).

The decision is a run's (:func:`launcher.lifecycle.decide.decision`), taken for the trial the task trained, an
ordinary run: a trial whose attempt ended inside the job (it checkpointed and requeued itself, or was
cancelled after a checkpoint) needs nothing; a job being cancelled, or one SLURM takes down or requeues by
itself, is left to that (a requeued task adopts its own trial again). A worker that died otherwise ends its
trial's attempt as lost, the trial FAIL and its parameters enqueued again (up to ``retries``), and this array
task is requeued while the study is short of its count, so that a worker takes the retry even when the others
have finished.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from optuna.trial import TrialState

from launcher import runs
from launcher.lifecycle.decide import decision, record_outcome, requeue_job, slurm_state
from launcher.sweep.study import SweepDir, ask_lock, counts, fail_and_retry, open_study, read_sweep_dir

LEFT_ALONE = ("decided", "cancelled", "slurm")  # the attempt ended inside the job, or is SLURM's or a cancel's


def _say(message: str) -> None:
    print(f"[sweep] {time.strftime('%H:%M:%S')} {message}", flush=True)


def trial_decision(run_dir: Path, job_id: str, restart: int, state: str, max_requeues: int) -> tuple[str, int]:
    """The decision for this array task's attempt of the trial in ``run_dir``, and that attempt's number there
    (a trial counts the restarts of its array task since it began there)."""
    record = runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) or {}
    attempt = restart - int(record.get("restart_offset", 0))
    return decision(record, attempt, state, max_requeues, restart), attempt


def recover(root: Path, status: int) -> str:
    job_id = os.environ["SLURM_JOB_ID"]
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    spec, job = read_sweep_dir(root)
    max_requeues = job["resources"]["max_requeues"]
    state = slurm_state(job_id)
    study = open_study(root, spec)
    with ask_lock(root):
        mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if (t.user_attrs.get("owner") or {}).get("job") == job_id]
        what = decision({}, restart, state, max_requeues, restart)
        for trial in mine:
            run_dir = SweepDir(root).trial(trial.number)
            what, attempt = trial_decision(run_dir, job_id, restart, state, max_requeues)
            if what in LEFT_ALONE:
                return what
            record_outcome(run_dir, job_id, attempt, "FAILED", "lost", exit=status)
            _say(fail_and_retry(study, spec, trial, f"its worker (job {job_id}) ended with status {status}"))
        short = counts(study)["done"] < spec.trials
    if what in LEFT_ALONE or what == "requeue-limit":
        return what
    if not short:
        return "failed"
    refused = requeue_job(job_id)
    _say(f"scontrol requeue failed: {refused}" if refused else f"requeued worker job {job_id}")
    return "requeue"
