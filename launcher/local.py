"""``launcher submit --local``: the same job on this machine, in the foreground.

N processes (``--nproc``, default ``resources.tasks_per_node`` capped to this machine) each run
``python -m launcher.entry RUN_DIR`` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set:
the training entry the SLURM tasks run, on gloo (CPU) or one process per local GPU. Their output
streams to the terminal (rank 0 as is, others prefixed) and into ``RUN/logs/``. Ctrl-C, SIGTERM and
SIGUSR2 are passed to every rank as SIGTERM/SIGUSR2, so they checkpoint together and stop with
:data:`~lenstrain.run.preemption.EXIT_REQUEUE`; running the same command again resumes. A second Ctrl-C
kills them. ``launcher cancel`` finds the ranks through the pids recorded in ``jobs.json``.

When one rank exits abnormally (a signal, an error), the others cannot go on (their collectives
would wait for it): they are stopped within seconds, and the last thing printed says which rank died
and how, the newest complete checkpoint, and the command that resumes from it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher import runs
from launcher.spec import JobSpec
from lenstrain.checkpointing.rundir import RunDir
from shards.exitcodes import EXIT_REQUEUE, MEANINGS

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


def cap_workers(spec: JobSpec, nproc: int) -> str | None:
    """Lower ``data.workers`` to the CPUs each local process has (``os.cpu_count() // nproc``).

    Returns the note to print once, or None when the job asks for no more than that.
    """
    cpus = os.cpu_count() or 1
    cap = cpus // max(nproc, 1)
    if spec.data.workers <= cap:
        return None
    note = (f"data.workers {spec.data.workers} -> {cap}: this machine has {cpus} CPU(s) for {nproc} local "
            f"process(es)")
    spec.data.workers = cap
    return note


# ------------------------------------------------------------------------------------ the ranks


@dataclass
class Ranks:
    """The local processes of one job, the threads copying their output, and their log files."""

    children: list[subprocess.Popen] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    logs: list = field(default_factory=list)

    def signal(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL every rank still running, with the processes it started (its data workers)."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)  # a rank leads its own process group

    def close(self) -> None:
        for pump in self.pumps:
            pump.join(timeout=5)
        for log in self.logs:
            log.close()


def _pump(stream, sinks, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        for sink, pre in sinks:
            sink.write((prefix if pre else "") + line)
            sink.flush()
    stream.close()


def _rank_env(spec: JobSpec, nproc: int, job_id: str) -> dict:
    from lenstrain.parallel.distributed import free_port

    fair = max(1, (os.cpu_count() or 1) // nproc)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "LENSTRAIN_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"})
    env.setdefault("OMP_NUM_THREADS", str(min(spec.resources.cpus_per_task or fair, fair)))
    return env


def start_ranks(run_dir: Path, name: str, nproc: int, env: dict, job_id: str) -> Ranks:
    log_dir = RunDir(run_dir).logs
    log_dir.mkdir(exist_ok=True)
    ranks = Ranks()
    for rank in range(nproc):
        log = open(log_dir / f"{job_id}_{rank}.log", "w")  # noqa: SIM115 - closed by Ranks.close
        ranks.logs.append(log)
        child = subprocess.Popen(
            [sys.executable, "-u", "-m", "launcher.entry", str(run_dir), "--name", name],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        ranks.children.append(child)
        sinks = [(sys.stdout, True), (log, False)]
        pump = threading.Thread(target=_pump, args=(child.stdout, sinks, f"[rank {rank}] " if rank else ""), daemon=True)
        pump.start()
        ranks.pumps.append(pump)
    return ranks


def _forwarder(ranks: Ranks):
    """A signal handler passing Ctrl-C (as SIGTERM), SIGTERM and SIGUSR2 to the ranks; a second Ctrl-C kills."""
    interrupts = 0

    def forward(signum, frame):  # noqa: ARG001
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            print("[launcher] killing the local ranks", file=sys.stderr, flush=True)
            ranks.kill()
            return
        sent = signal.SIGTERM if signum == signal.SIGINT else signum
        print(f"[launcher] passing {signal.Signals(sent).name} to {len(ranks.children)} rank(s): they checkpoint "
              "and stop (Ctrl-C again to kill)", file=sys.stderr, flush=True)
        ranks.signal(sent)

    return forward


def _abnormal(code: int | None) -> bool:
    return code is not None and code not in (0, EXIT_REQUEUE)


def wait_ranks(ranks: Ranks) -> tuple[list[int], int | None, int]:
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


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    meaning = MEANINGS.get(code)
    return f"exited with status {code}" + (f" ({meaning})" if meaning else "")


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
    pids = [child.pid for child in ranks.children]
    runs.update_jobs(run_dir, lambda data: runs.find_job(data, job_id).update(rank_pids=pids))
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, _forwarder(ranks)) for sig in handled}
    try:
        codes, failed, stopped = wait_ranks(ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ranks.close()
    if failed is None:
        return codes[0] or next((c for c in codes if c), 0)
    code = codes[failed]
    runs.record_end(run_dir, job_id, state="FAILED", outcome=f"rank {failed} {describe_exit(code)}", exit=code)
    sys.stdout.flush()
    print(failure_summary(run_dir, failed, code, nproc, stopped), file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


# ----------------------------------------------------------------------------------- cancelling


def rank_alive(pid: int) -> bool:
    """Whether ``pid`` is a live local rank (``launcher.entry``) on this machine."""
    try:
        return b"launcher.entry" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def launcher_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live ``python -m launcher`` process on this machine."""
    try:
        return pid is not None and b"launcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def lost_jobs(data: dict) -> list[str]:
    """Ids of the run's local jobs still marked active although neither their launcher nor any rank runs
    on this machine any more (the launcher was killed outright, or the machine rebooted)."""
    return [job["job_id"] for job in data["jobs"]
            if job.get("kind") == "local" and job.get("state") in runs.ACTIVE_STATES
            and job.get("host") == socket.gethostname() and not launcher_alive(job.get("pid"))
            and not any(rank_alive(pid) for pid in job.get("rank_pids", []))]


def live_jobs(data: dict) -> list[dict]:
    """The run's local jobs whose ranks still run on this machine."""
    return [job for job in data["jobs"]
            if job.get("kind") == "local" and job.get("host") == socket.gethostname()
            and any(rank_alive(pid) for pid in job.get("rank_pids", []))]


def stop_job(run_dir: Path, job: dict, timeout_s: float = 300) -> bool:
    """SIGTERM a local job's ranks (they save a checkpoint together and exit); True once they are gone."""
    runs.update_jobs(run_dir, lambda data: runs.find_job(data, job["job_id"]).update(cancel_requested=time.time()))
    for pid in job["rank_pids"]:
        if rank_alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(rank_alive(pid) for pid in job["rank_pids"]):
            return True
        time.sleep(0.2)
    return False
