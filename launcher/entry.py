"""What every task of a job runs: set up torch.distributed's environment, train, and requeue on a signal.

submitit pickles a :class:`TrainTask` (by reference to this module, which the job imports from the
installed package) and calls it on each of the job's ``srun`` tasks. The task:

1. replaces submitit's signal handlers at once with a flag-only one (submitit's would checkpoint and
   ``SystemExit`` on global rank 0 only, mid-collective); training installs its own right after;
2. derives RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM's variables;
3. loads the run's ``config.yaml`` (written once by the launcher) and calls
   :func:`lenstrain.train.run_training`, which resumes from the newest complete checkpoint;
4. on :data:`~lenstrain.preemption.EXIT_REQUEUE` (a collective save after SIGUSR2/SIGTERM), global
   rank 0 requeues the job with ``scontrol requeue`` if the run's requeues so far (every job's, across
   resumes) are below ``max_requeues`` and the job is not being cancelled or requeued already; then
   every rank leaves with ``os._exit`` and no return value, so that submitit writes no result pickle
   and does not take the attempt for a finished job;
5. when a collective fails because another rank died or hung past ``parallel.timeout_s``, notes that
   in ``jobs.json`` and leaves with :data:`~launcher.recovery.EXIT_RANK_LOST`; the batch step then
   requeues the job (:mod:`launcher.recovery`). Any other error is noted as permanent.

Local runs (``launcher submit --local``) run the same class in N subprocesses:
``python -m launcher.entry RUN_DIR --name NAME`` with RANK/WORLD_SIZE/... set by :mod:`launcher.local`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from launcher.lifecycle.decide import requeue_job
from launcher.recovery import EXIT_RANK_LOST, collective_failure, describe_failure
from lenstrain.run.hooks import EXIT_PRUNED
from lenstrain.run.preemption import EXIT_NONFINITE, EXIT_REQUEUE, PreemptionFlag

# States in which the controller is already taking the job down (cancel, requeue, preemption):
# requeueing it again would undo a cancel or race SLURM's own requeue.
_NO_REQUEUE_STATES = {"CANCELLED", "COMPLETING", "COMPLETED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                      "PENDING", "PREEMPTED", "FAILED", "TIMEOUT", "NODE_FAIL", "DEADLINE", "OUT_OF_MEMORY"}


# How training may end with a result: complete, or pruned (a sweep's pruner stopped it after a checkpoint, see
# lenstrain.run.hooks): the job's state, the attempt's outcome, and what is said.
_ENDINGS = {0: ("COMPLETED", "completed", "training complete"), EXIT_PRUNED: ("PRUNED", "pruned", "pruned")}


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _say(message: str) -> None:
    print(f"[launcher] {time.strftime('%H:%M:%S')} {message}", flush=True)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _redeliver_early_signal(early: PreemptionFlag, done: threading.Event) -> None:
    """Hand a signal that arrived during start-up to training once it has installed its handlers.

    The time-limit signal may come while the task is still importing torch or joining the process
    group; training's flag would never see it and the job would be killed at the limit.
    """
    mine = signal.getsignal(signal.SIGUSR2)
    while not done.wait(0.05):
        if signal.getsignal(signal.SIGUSR2) is not mine:  # training took over
            if early.set:
                _say(f"passing signal {early.signum}, received during start-up, to training")
                os.kill(os.getpid(), early.signum)
            return


def _set_threads() -> None:
    """One intra-op thread per allocated CPU (SLURM: --cpus-per-task), unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))))


class TrainTask:
    """The picklable callable one SLURM task (or one local process) runs: it carries the run directory,
    and trains from the ``config.yaml`` there."""

    def __init__(self, run_dir: str | Path, *, max_requeues: int, name: str, restart_offset: int = 0,
                 array_task: bool = False) -> None:
        """``restart_offset``: the job's SLURM restart count when it started this run. A sweep worker's array
        task runs many trials, and each trial counts (and records) only the requeues since it began.
        ``array_task``: one task of a ``--seeds`` array, known in ``jobs.json`` as ``ARRAYID_INDEX``."""
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.name = name
        self.restart_offset = restart_offset
        self.array_task = array_task

    def __call__(self) -> dict:
        early = PreemptionFlag().install()  # until training installs its own
        started = threading.Event()
        threading.Thread(target=_redeliver_early_signal, args=(early, started), daemon=True).start()
        slurm, rank, job_id, restart = self._environment()
        run_dir = Path(self.run_dir)
        _set_threads()

        from launcher import runs
        from lenstrain.run.train import run_training

        config = runs.load_training_config(run_dir)
        if rank == 0:
            info = {"host": socket.gethostname(), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
            if slurm:
                info["nodes"] = os.environ.get("SLURM_JOB_NODELIST", "")
            runs.record_start(run_dir, job_id, restart_count=restart, **info)
            _say(f"job {job_id} attempt {restart + 1} starting {self.name} in {run_dir}")
        try:
            code = run_training(config, run_dir)
        except Exception as exc:
            code = self._failed(exc, rank, job_id, restart)
        finally:
            started.set()
        return self._ended(code, rank, job_id, restart, slurm)

    def _environment(self) -> tuple[bool, int, str, int]:
        """Under SLURM, torch.distributed's variables from SLURM's; then whether it is SLURM, the global rank,
        the job's id in ``jobs.json`` and this attempt's number (counted from ``restart_offset``)."""
        slurm = "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ
        if slurm:
            from lenstrain.parallel.distributed import env_from_slurm

            os.environ.update(env_from_slurm())
            if getattr(self, "array_task", False) and "SLURM_ARRAY_JOB_ID" in os.environ:
                os.environ.setdefault("LENSTRAIN_JOB_ID",
                                      f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
            os.environ.setdefault("LENSTRAIN_JOB_ID", os.environ["SLURM_JOB_ID"])
        rank = int(os.environ.get("RANK", "0"))
        job_id = os.environ.get("LENSTRAIN_JOB_ID", f"local-{os.getpid()}")
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0")) - self.restart_offset
        return slurm, rank, job_id, restart

    def _ended(self, code: int, rank: int, job_id: str, restart: int, slurm: bool) -> dict:
        """After training returned ``code``: record how the attempt ended, and return, requeue or raise."""
        from launcher import runs

        run_dir = Path(self.run_dir)
        step = (runs.read_progress(run_dir) or {}).get("step")
        if code in _ENDINGS:
            state, outcome, words = _ENDINGS[code]
            if rank == 0:
                runs.record_end(run_dir, job_id, state=state, outcome=outcome, exit=code, step=step)
                _say(f"{words} at step {step}")
            if slurm and code == 0:
                atexit.register(exit_clean_after_result)
            return {"run_dir": self.run_dir, "step": step, "exit": code}
        if code == EXIT_REQUEUE:
            self._requeue_and_exit(rank, job_id, restart, slurm, step)
        if code == EXIT_RANK_LOST:  # the launcher decides (locally) or the batch step (launcher.recovery)
            _flush()
            os._exit(EXIT_RANK_LOST)
        why = "a non-finite loss" if code == EXIT_NONFINITE else f"exit status {code}"
        runs.record_failure(run_dir, job_id, restart, rank=rank, exit=code, why=why)
        if rank == 0:
            runs.record_end(run_dir, job_id, state="FAILED", outcome="failed", exit=code, step=step)
        raise TrainingFailed(f"training stopped with {why} at step {step}; see the log above", code)

    def _failed(self, exc: Exception, rank: int, job_id: str, restart: int) -> int:
        """A collective that lost a peer returns :data:`EXIT_RANK_LOST` (noted as transient); any other
        error is noted as permanent and raised again."""
        from launcher import runs

        why = describe_failure(exc)
        if not collective_failure(exc):
            runs.record_failure(Path(self.run_dir), job_id, restart, rank=rank, exit=1, why=why)
            raise exc
        _say(f"rank {rank}: a collective failed; another rank died or hung past parallel.timeout_s ({why})")
        runs.record_failure(Path(self.run_dir), job_id, restart, rank=rank, exit=EXIT_RANK_LOST, why=why,
                            transient=True)
        return EXIT_RANK_LOST

    def _requeue_and_exit(self, rank: int, job_id: str, restart: int, slurm: bool, step) -> None:
        from launcher import runs

        run_dir = Path(self.run_dir)
        if rank == 0:
            outcome, state = "stopped", "STOPPED"
            if slurm:
                outcome, state = self._requeue(job_id, restart)
            elif (runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) or {}).get("cancel_requested"):
                outcome, state = "cancelled", "CANCELLED"
                _say(f"cancelled at step {step} after a checkpoint")
            else:
                _say(f"stopped at step {step} after a checkpoint; run the same command again to resume")
            runs.record_end(run_dir, job_id, state=state, outcome=outcome, exit=EXIT_REQUEUE, step=step)
        elif slurm:
            _wait_for_rank0(run_dir, job_id, restart)
        _flush()
        os._exit(EXIT_REQUEUE)

    def _requeue(self, job_id: str, restart: int) -> tuple[str, str]:
        from launcher import runs
        from launcher.slurm import squeue_state

        run_dir = Path(self.run_dir)
        data = runs.read_jobs(run_dir, set_aside=True)
        job = runs.find_job(data, job_id) or {}
        state = (squeue_state(job_id) or "UNKNOWN").split()[0]
        requeues = max(runs.run_requeues(data), restart)
        if job.get("cancel_requested") or state == "CANCELLED":
            _say(f"job {job_id} is being cancelled; not requeueing (resume later with `launcher resume {self.name}`)")
            return "cancelled", "CANCELLED"
        if state in _NO_REQUEUE_STATES:
            _say(f"job {job_id} is already {state}: SLURM requeues or ends it; not requeueing it again")
            return "requeued-by-slurm", state
        if requeues >= self.max_requeues:
            _say(f"run {self.name} has been requeued {requeues} times (resources.max_requeues={self.max_requeues}, "
                 f"counted across resumes); not requeueing. Continue with `python -m launcher resume {self.name} "
                 f"--set resources.max_requeues={requeues + 1}`")
            return "requeue-limit", "STOPPED"
        refused = requeue_job(job_id)
        if refused:
            _say(f"scontrol requeue {job_id} failed: {refused}")
            return "requeue-failed", "STOPPED"
        _say(f"requeued job {job_id} (requeue {requeues + 1} of the run's at most {self.max_requeues})")
        runs.set_requeues(run_dir, job_id, restart + 1)
        return "requeued", "REQUEUED"


def _wait_for_rank0(run_dir: Path, job_id: str, restart: int, timeout_s: float = 30) -> None:
    """Let rank 0 requeue before this task exits: where SLURM kills a job step when one of its tasks
    exits non-zero (KillOnBadExit), an early exit here could kill rank 0 before its requeue."""
    from launcher import runs

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) or {}
        attempts = [a for a in job.get("attempts", []) if a.get("restart_count") == restart]
        if attempts and "ended" in attempts[-1]:
            return
        time.sleep(0.1)


def exit_clean_after_result() -> None:
    """After submitit has written the result pickle, leave without running C++ teardown.

    gloo sometimes aborts at interpreter exit ("terminate called without an active exception"),
    which would turn a finished task into a failed SLURM step.
    """
    try:
        from submitit import JobEnvironment

        if not JobEnvironment().paths.result_pickle.exists():
            return
    except (RuntimeError, KeyError):  # outside a submitit job (it names no environment): a normal exit
        return
    _flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.entry RUN_DIR [--name NAME]``: one local rank of a run (see :mod:`launcher.local`).

    A local run is never requeued: a stopped one continues when the same command runs again.
    """
    parser = argparse.ArgumentParser(prog="python -m launcher.entry")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", help="the run's name, for messages (default: the directory's name)")
    args = parser.parse_args(argv)
    task = TrainTask(args.run_dir, max_requeues=0, name=args.name or args.run_dir.name)
    try:
        task()
        code = 0
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.code
    _flush()
    os._exit(code)


if __name__ == "__main__":
    main()
