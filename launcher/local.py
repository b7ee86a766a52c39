"""``launcher submit --local``: the same job on this machine, in the foreground.

N processes (``--nproc``, default ``resources.tasks_per_node`` capped to this machine) each run
``python -m launcher.entry RUN_DIR`` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set:
the training entry the SLURM tasks run, on gloo (CPU) or one process per local GPU. Their output
streams to the terminal (rank 0 as is, others prefixed) and into ``RUN/logs/``. Ctrl-C, SIGTERM and
SIGUSR2 are passed to every rank as SIGTERM/SIGUSR2, so they checkpoint together and stop with
exit status 42; running the same command again resumes. A second Ctrl-C kills them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher import runs
from launcher.spec import JobSpec

KILL_AFTER_S = 60


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
    if spec.parallel.strategy == "single" and nproc > 1:
        errors.append(("parallel.strategy", f"'single' runs one process, not {nproc}; valid choices: ddp, deepspeed"))
    if spec.parallel.backend == "nccl" and kind != "cuda":
        errors.append(("parallel.backend", "nccl needs a GPU and this machine has none; use --set parallel.backend=auto"))
    return errors


def _pump(stream, sinks, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        for sink, pre in sinks:
            sink.write((prefix if pre else "") + line)
            sink.flush()
    stream.close()


def run_local(spec: JobSpec, run_dir: Path, nproc: int) -> int:
    """Train ``spec`` in ``run_dir`` with ``nproc`` local processes; returns training's exit status."""
    from lenstrain.spawn import free_port

    kind, count = local_devices()
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    fair = max(1, (os.cpu_count() or 1) // nproc)
    threads = min(spec.resources.cpus_per_task or fair, fair)
    runs.add_job(run_dir, job_id, kind="local", nproc=nproc, device=kind, state="RUNNING")
    log_dir = run_dir / runs.LOCAL_LOG_DIR
    log_dir.mkdir(exist_ok=True)

    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update({"WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                 "LENSTRAIN_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"})
    base.setdefault("OMP_NUM_THREADS", str(threads))
    print(f"[launcher] local job {job_id}: {nproc} process(es) on {kind}"
          f"{'' if kind == 'cpu' else f' ({count} GPU(s))'}, {base['OMP_NUM_THREADS']} thread(s) each; "
          f"logs in {log_dir}", flush=True)

    children: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    logs = []
    for rank in range(nproc):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = open(log_dir / f"{job_id}_{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        child = subprocess.Popen(
            [sys.executable, "-u", "-m", "launcher.entry", str(run_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        children.append(child)
        pump = threading.Thread(target=_pump, args=(child.stdout, [(sys.stdout, True), (log, False)], f"[rank {rank}] "
                                                    if rank else ""), daemon=True)
        pump.start()
        pumps.append(pump)

    interrupts = 0

    def forward(signum, frame):  # noqa: ARG001
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            print("[launcher] killing the local ranks", file=sys.stderr, flush=True)
            for child in children:
                if child.poll() is None:
                    child.kill()
            return
        sent = signal.SIGTERM if signum == signal.SIGINT else signum
        print(f"[launcher] passing {signal.Signals(sent).name} to {nproc} rank(s): they checkpoint and stop "
              "(Ctrl-C again to kill)", file=sys.stderr, flush=True)
        for child in children:
            if child.poll() is None:
                child.send_signal(sent)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=5)
        for log in logs:
            log.close()
    code = codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)
    if code < 0 or (code not in (0, 42) and runs.find_job(runs.read_jobs(run_dir), job_id).get("state") == "RUNNING"):
        runs.record_end(run_dir, job_id, state="FAILED", outcome="failed", exit=code)
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    return code
