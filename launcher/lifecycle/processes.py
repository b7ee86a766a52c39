"""Local processes of a job: a run's ranks (``launcher.entry``) or a sweep's workers (``launcher.sweep.worker``).

- liveness: a pid is one of ours while ``/proc/PID/cmdline`` names its module (a reused pid is not);
- :class:`Children`: start them with their output streamed to the terminal (prefixed) and into a log file each,
  pass Ctrl-C (as SIGTERM), SIGTERM and SIGUSR2 on to them, kill them;
- a local job's record in ``jobs.json`` keeps its children's pids (``rank_pids`` or ``worker_pids``), so that
  ``status``, ``cancel`` and a second ``submit`` know whether it still runs here.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launcher.runs import ACTIVE_STATES
from shards.exitcodes import MEANINGS

# A local job's record names its children under one of these keys, each with the module its processes run.
CHILD_PIDS = {"rank_pids": b"launcher.entry", "worker_pids": b"launcher.sweep"}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


# ------------------------------------------------------------------------------------ liveness


def runs_module(pid: int | None, module: bytes) -> bool:
    """Whether ``pid`` is a live process of this machine whose command line names ``module``."""
    try:
        return pid is not None and module in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def rank_alive(pid: int) -> bool:
    """Whether ``pid`` is a live local rank (``launcher.entry``) on this machine."""
    return runs_module(pid, CHILD_PIDS["rank_pids"])


def worker_alive(pid: int) -> bool:
    """Whether ``pid`` is a live local sweep worker on this machine."""
    return runs_module(pid, CHILD_PIDS["worker_pids"])


def launcher_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live ``python -m launcher`` process on this machine."""
    return runs_module(pid, b"launcher")


def live_children(job: dict) -> list[int]:
    """The pids of a local job's children that still run on this machine."""
    if job.get("kind") != "local" or job.get("host") != socket.gethostname():
        return []
    return [pid for key, module in CHILD_PIDS.items() for pid in job.get(key, []) if runs_module(pid, module)]


def live_jobs(data: dict) -> list[dict]:
    """The local jobs of a ``jobs.json`` whose children (ranks or workers) still run on this machine."""
    return [job for job in data["jobs"] if live_children(job)]


def lost_jobs(data: dict) -> list[str]:
    """Ids of the local jobs still marked active although neither their launcher nor any child runs on this
    machine any more (the launcher was killed outright, or the machine rebooted)."""
    return [job["job_id"] for job in data["jobs"]
            if job.get("kind") == "local" and job.get("state") in ACTIVE_STATES
            and job.get("host") == socket.gethostname() and not launcher_alive(job.get("pid"))
            and not live_children(job)]


def terminate(job: dict, timeout_s: float = 0.0) -> bool:
    """SIGTERM a local job's live children (they checkpoint and leave); True once they are gone within
    ``timeout_s`` (0: do not wait)."""
    for pid in live_children(job):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while live_children(job):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def describe_exit(code: int) -> str:
    """``was killed by SIGKILL``, or ``exited with status 42 (meaning)``."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    meaning = MEANINGS.get(code)
    return f"exited with status {code}" + (f" ({meaning})" if meaning else "")


def cap_workers(spec, processes: int, what: str = "local process(es)") -> str | None:
    """Lower ``data.workers`` to the CPUs each of ``processes`` local processes gets (``os.cpu_count() // n``).

    Returns the note to print once, or None when the job asks for no more than that."""
    cpus = os.cpu_count() or 1
    cap = cpus // max(processes, 1)
    if spec.data.workers <= cap:
        return None
    note = f"data.workers {spec.data.workers} -> {cap}: this machine has {cpus} CPU(s) for {processes} {what}"
    spec.data.workers = cap
    return note


# ------------------------------------------------------------------------------------ children


def _pump(stream, sinks, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        for sink, pre in sinks:
            sink.write((prefix if pre else "") + line)
            sink.flush()
    stream.close()


@dataclass
class Children:
    """The local processes of one job (``noun``: what they are, for messages), the threads copying their output,
    and their log files."""

    noun: str = "rank(s)"
    children: list[subprocess.Popen] = field(default_factory=list)
    pumps: list[threading.Thread] = field(default_factory=list)
    logs: list = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    def start(self, argv: list[str], env: dict, log: Path, prefix: str = "", append: bool = False) -> None:
        """Start ``python -u -m ARGV...`` in its own session; its output goes to the terminal (after
        ``prefix``) and to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        sink = open(log, "a" if append else "w")  # noqa: SIM115 - closed by Children.close
        self.logs.append(sink)
        child = subprocess.Popen([sys.executable, "-u", "-m", *argv], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(child)
        pump = threading.Thread(target=_pump, args=(child.stdout, [(sys.stdout, True), (sink, False)], prefix),
                                daemon=True)
        pump.start()
        self.pumps.append(pump)

    def signal(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL every child still running, with the processes it started (its data workers)."""
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)  # a child leads its own process group

    def close(self) -> None:
        for pump in self.pumps:
            pump.join(timeout=5)
        for log in self.logs:
            log.close()

    @contextlib.contextmanager
    def supervised(self) -> Iterator[Children]:
        """While inside: Ctrl-C (as SIGTERM), SIGTERM and SIGUSR2 are passed on to the children, and a second
        Ctrl-C kills them. After: the handlers as they were, and the output copied to its end."""
        previous = {sig: signal.signal(sig, _forwarder(self)) for sig in FORWARDED}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()


def _forwarder(children: Children):
    interrupts = 0

    def forward(signum, frame):  # noqa: ARG001
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            print(f"[launcher] killing the local {children.noun}", file=sys.stderr, flush=True)
            children.kill()
            return
        sent = signal.SIGTERM if signum == signal.SIGINT else signum
        print(f"[launcher] passing {signal.Signals(sent).name} to {len(children.children)} {children.noun}: they "
              "checkpoint and stop (Ctrl-C again to kill)", file=sys.stderr, flush=True)
        children.signal(sent)

    return forward
