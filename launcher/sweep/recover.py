"""The sweep array's batch-script teardown after a worker's step failed: ``python -m launcher.sweep.recover
SWEEP_DIR --status S``.

A worker that checkpointed and requeued itself, or was cancelled after a checkpoint, has ended its trial's
attempt already: nothing to do. A worker that died (killed, lost) leaves its trial FAIL and the trial's
parameters enqueued again (up to ``retries``), and this array task is requeued while the study is short of
its count, so that a worker takes the retry even when the others have finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from launcher import runs
from launcher.sweep.study import SweepDir, ask_lock, counts, fail_and_retry, open_study, read_sweep_dir


def _say(message: str) -> None:
    print(f"[sweep] {time.strftime('%H:%M:%S')} {message}", flush=True)


def attempt_ended(run_dir: Path, job_id: str) -> bool:
    job = runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) or {}
    attempts = job.get("attempts", [])
    return bool(attempts) and "ended" in attempts[-1]


def recover(root: Path, status: int) -> str:
    job_id = os.environ["SLURM_JOB_ID"]
    spec, job = read_sweep_dir(root)
    study = open_study(root, spec)
    with ask_lock(root):
        mine = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if (t.user_attrs.get("owner") or {}).get("job") == job_id
        ]
        for trial in mine:
            if attempt_ended(SweepDir(root).trial(trial.number), job_id):
                return "decided"
            _say(fail_and_retry(study, spec, trial, f"its worker (job {job_id}) ended with status {status}"))
        short = counts(study)["done"] < spec.trials
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if not short or restart >= job["resources"]["max_requeues"]:
        return "failed"
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    _say(
        f"requeued worker job {job_id}"
        if done.returncode == 0
        else f"scontrol requeue failed: {done.stderr.strip()}"
    )
    return "requeued"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.sweep.recover")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--status", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        recover(args.sweep_dir, args.status)
    except Exception as exc:  # noqa: BLE001 - the script still exits with srun's status
        _say(f"could not recover: {type(exc).__name__}: {exc}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
