"""``launcher submit --local``: the same job on this machine, in the foreground.

N processes (``--nproc``, default ``resources.tasks_per_node`` capped to this machine) each run
``python -m launcher.entry RUN_DIR`` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set:
the training entry the SLURM tasks run, on gloo (CPU) or one process per local GPU. Their output
streams to the terminal (rank 0 as is, others prefixed) and into ``RUN/logs/``. Ctrl-C, SIGTERM and
SIGUSR2 are passed to every rank as SIGTERM/SIGUSR2, so they checkpoint together and stop with
:data:`~lenstrain.preemption.EXIT_REQUEUE`; running the same command again resumes. A second Ctrl-C
kills them. ``launcher cancel`` finds the ranks through the pids recorded in ``jobs.json``.

When one rank exits abnormally (a signal, an error), the others cannot go on (their collectives
would wait for it): they are stopped within seconds, and the last thing printed says which rank died
and how, the newest complete checkpoint, and the command that resumes from it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher import runs
from launcher.lifecycle.processes import Children, describe_exit, terminate
from launcher.lifecycle.processes import live_jobs as live_jobs  # cancel and a second submit ask it
from launcher.lifecycle.processes import rank_alive as rank_alive  # whether a rank still runs here
from launcher.spec import JobSpec
from lenstrain.checkpointing.rundir import RunDir
from shards.exitcodes import EXIT_REQUEUE

STOP_GRACE_S = 3.0  # survivors of a dead rank get this long to leave on their own, then are killed
POLL_S = 0.1


def local_devices() -> tuple[str, int]:
    """('cuda', n_gpus) or ('cpu', n_cpus)."""
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda", torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "cpu", os.cpu_count() or 1


def default_nproc(spec: JobSpec) -> int:
    kind, count = local_devices()
    return max(1, min(spec.resources.ntasks_per_node, count))


def check_local(spec: JobSpec, nproc: int) -> list[tuple[str, str]]:
    """Problems running ``spec`` here with ``nproc`` processes, as (path, message)."""
    kind, count = local_devices()
    errors = []
    if nproc < 1:
        errors.append(("--nproc", f"{nproc}: need at least 1 process"))
    if kind == "cuda" and nproc > count:
        errors.append(("--nproc", f"{nproc} processes but this machine has {count} GPU(s); one process drives one GPU"))
    if spec.parallel.backend == "nccl" and kind != "cuda":
        errors.append(("parallel.backend", "nccl needs a GPU and this machine has none; use --set parallel.backend=auto"))
    return errors


# ------------------------------------------------------------------------------------ the ranks


def _rank_env(spec: JobSpec, nproc: int, job_id: str) -> dict:
    from lenstrain.parallel.distributed import free_port

    fair = max(1, (os.cpu_count() or 1) // nproc)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "LENSTRAIN_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", str(min(spec.resources.cpus_per_task or fair, fair)))
    return env


def start_ranks(run_dir: Path, name: str, nproc: int, env: dict, job_id: str) -> Children:
    ranks = Children("rank(s)")
    for rank in range(nproc):
        ranks.start(["launcher.entry", str(run_dir), "--name", name],
                    {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    RunDir(run_dir).logs / f"{job_id}_{rank}.log", f"[rank {rank}] " if rank else "")
    return ranks


def _abnormal(code: int | None) -> bool:
    return code is not None and code not in (0, EXIT_REQUEUE)


def wait_ranks(ranks: Children) -> tuple[list[int], int | None, int]:
    """Wait for every rank. When one exits abnormally, stop the others: they get :data:`STOP_GRACE_S`
    to leave by themselves, then SIGKILL. Returns the exit codes, the rank that failed first (or None)
    and how many ranks had to be killed."""
    while True:
        codes = [child.poll() for child in ranks.children]
        failed = [rank for rank, code in enumerate(codes) if _abnormal(code)]
        if failed:
            break
        if all(code is not None for code in codes):
            return codes, None, 0
        time.sleep(POLL_S)
    first = min(failed, key=lambda rank: (codes[rank] >= 0, rank))  # a signal is the cause, errors follow it
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(child.poll() is None for child in ranks.children):
        time.sleep(POLL_S)
    stopped = sum(child.poll() is None for child in ranks.children)
    ranks.kill()
    return [child.wait() for child in ranks.children], first, stopped


def resume_command(run_dir: Path, nproc: int) -> str:
    """The command that continues a local run from its newest checkpoint, with the same ranks."""
    return f"python -m launcher resume {runs.run_ref(run_dir)} --local --nproc {nproc}"


def failure_summary(run_dir: Path, rank: int, code: int, nproc: int, stopped: int) -> str:
    """What the user reads last: which rank died and how, the newest complete checkpoint, how to resume."""
    newest = runs.newest_checkpoint(run_dir)
    others = f"; stopped {stopped} other rank(s)" if stopped else ""
    where = (f"newest complete checkpoint: {newest.name} ({newest})" if newest
             else "no complete checkpoint yet: a resume starts from step 0")
    return (f"[launcher] rank {rank} {describe_exit(code)}{others}.\n"
            f"  {where}\n"
            f"  resume with: {resume_command(run_dir, nproc)}")


# ------------------------------------------------------------------------------------- the job


@dataclass
class LocalJob:
    """A local job recorded in jobs.json, not started yet."""

    job_id: str
    env: dict
    kind: str
    count: int


def register_local(spec: JobSpec, run_dir: Path, nproc: int) -> LocalJob:
    """Record a local job of ``nproc`` ranks in the run's jobs.json (the launcher holds the run lock)."""
    kind, count = local_devices()
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    env = _rank_env(spec, nproc, job_id)
    runs.add_job(run_dir, job_id, kind="local", nproc=nproc, device=kind, state="RUNNING",
                 host=socket.gethostname(), pid=os.getpid())
    return LocalJob(job_id, env, kind, count)


def run_local(spec: JobSpec, run_dir: Path, nproc: int, name: str, job: LocalJob | None = None) -> int:
    """Train the run in ``run_dir`` with ``nproc`` local processes (``job``: recorded already by
    :func:`register_local`); returns training's exit status."""
    job = job or register_local(spec, run_dir, nproc)
    job_id, env, kind, count = job.job_id, job.env, job.kind, job.count
    print(f"[launcher] local job {job_id}: {nproc} process(es) on {kind}"
          f"{'' if kind == 'cpu' else f' ({count} GPU(s))'}, {env['OMP_NUM_THREADS']} thread(s) each; "
          f"logs in {RunDir(run_dir).logs}", flush=True)
    ranks = start_ranks(run_dir, name, nproc, env, job_id)
    runs.update_jobs(run_dir, lambda data: runs.find_job(data, job_id).update(rank_pids=ranks.pids))
    with ranks.supervised():
        codes, failed, stopped = wait_ranks(ranks)
    if failed is None:
        return codes[0] or next((c for c in codes if c), 0)
    code = codes[failed]
    runs.record_end(run_dir, job_id, state="FAILED", outcome=f"rank {failed} {describe_exit(code)}", exit=code)
    sys.stdout.flush()
    print(failure_summary(run_dir, failed, code, nproc, stopped), file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


# ----------------------------------------------------------------------------------- cancelling


def stop_job(run_dir: Path, job: dict, timeout_s: float = 300) -> bool:
    """SIGTERM a local job's ranks (they save a checkpoint together and exit); True once they are gone."""
    runs.update_jobs(run_dir, lambda data: runs.find_job(data, job["job_id"]).update(cancel_requested=time.time()))
    return terminate(job, timeout_s)
