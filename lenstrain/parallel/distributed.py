"""Process-group setup from the usual environment variables or from SLURM's."""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: float = 600  # parallel.timeout_s: how long a collective waits for every rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def free_port() -> int:
    """A TCP port that is free on this host now, for a local process group's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Above Linux's default ephemeral range (32768-60999): a port in that range may be held at any moment as
# the local end of some outgoing connection, and the job's store then fails to listen on it.
MASTER_PORT_BASE, MASTER_PORT_SPAN = 61000, 4500


def master_port_for_job(job_id: str | int) -> int:
    """A port derived from the job id, so every task of a job agrees without talking; outside the default
    ephemeral range (``MASTER_PORT`` in the environment overrides it)."""
    return MASTER_PORT_BASE + int(str(job_id).split("_")[0]) % MASTER_PORT_SPAN


def first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def env_from_slurm(environ: dict | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from a SLURM task's variables."""
    env = os.environ if environ is None else environ
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"])
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(master_port_for_job(env["SLURM_JOB_ID"]))
    return out


def nccl_watchdog_env(timeout_s: float, trace_dir: str | os.PathLike | None, environ=None) -> dict[str, str]:
    """The NCCL watchdog variables a GPU run gets, except those the user has set already.

    A collective that waits longer than ``timeout_s`` (``parallel.timeout_s``) aborts the process
    instead of hanging (async error handling); the heartbeat monitor also ends a rank whose watchdog
    thread itself is stuck that long; on a timeout each rank dumps its recent collectives to
    ``trace_dir/nccl_trace_rank_<rank>`` (the run's ``logs/``).
    """
    env = os.environ if environ is None else environ
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(max(1, math.ceil(timeout_s))),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    }
    if trace_dir is not None:
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(os.fspath(trace_dir), "nccl_trace_rank_")
    return {key: value for key, value in wanted.items() if key not in env}


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 600,
                     trace_dir: str | os.PathLike | None = None) -> DistInfo:
    """Join the process group described by the environment; a lone process runs without one.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or SLURM's task variables when those
    are absent. ``backend`` ``auto`` picks NCCL on GPU and gloo on CPU. A collective that waits
    longer than ``timeout_s`` for a rank fails (gloo raises; NCCL's watchdog, see
    :func:`nccl_watchdog_env`, aborts the process and dumps a trace into ``trace_dir``).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(env_from_slurm())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            if trace_dir is not None:
                os.makedirs(trace_dir, exist_ok=True)
            os.environ.update(nccl_watchdog_env(timeout_s, trace_dir))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, timeout_s=timeout_s)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
