"""DeepSpeed ZeRO behind the backend interface (``parallel.strategy: deepspeed``).

The engine owns the model weights, the gradients and the optimizer state (partitioned across ranks
by ZeRO stages 1-3, optionally offloaded to CPU memory). The loop drives it exactly as it drives
DDP, one micro-step at a time:

- ``accumulating(last)`` marks the gradient-accumulation boundary by hand
  (``engine.set_gradient_accumulation_boundary``), so DeepSpeed reduces gradients only on the last
  micro-step, like DDP's ``no_sync``. The config keeps ``gradient_accumulation_steps: 1``; the loop
  already divides each micro-step's loss by the number of micro-steps.
- ``backward(loss)`` is ``engine.backward(loss, scale_wrt_gas=False)`` (fp16 loss scaling included);
- ``step()`` is one ``engine.step()``: clipping (``gradient_clipping``; without ZeRO, here), the
  update and zeroing. It returns the global gradient norm.

Before each step's first forward, rank 0's buffers (batch-norm statistics) are broadcast, as DDP
does; DeepSpeed would let them drift apart between ranks and checkpoint only rank 0's.
bf16/fp16 run through DeepSpeed's ``torch_autocast`` (see :func:`deepspeed_config`).

Checkpoints are collective: on every rank ``save_state``/``load_state`` write and read
``step-N/deepspeed/`` through the engine (model states and each rank's optimizer partition), through
:class:`~lenstrain.parallel.deepspeed_files.ListedFilesCheckpointEngine`. The scheduler and everything
else outside the engine go through the base class's plain state files.
DeepSpeed itself is imported when a backend is built, not with this module.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lenstrain.checkpointing.stateio import DEEPSPEED_DIR
from lenstrain.parallel.base import Backend
from lenstrain.parallel.ddp import DDPBackend
from lenstrain.parallel.distributed import DistInfo, free_port
from lenstrain.parallel.skip import fill_momentum_buffers, skip_kind


def ensure_process_group(info: DistInfo) -> str:
    """Set the variables DeepSpeed reads (a lone process gets defaults) and join a process group.

    A multi-rank run already has its group (``init_distributed``); a lone process gets a group of
    one, so DeepSpeed never falls back to MPI discovery. Returns the backend name.
    """
    defaults = {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "MASTER_ADDR": "127.0.0.1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=info.timeout_s),
        )
    return dist.get_backend()


def clone_world_group(info: DistInfo) -> None:
    """Create DeepSpeed's copy of the world group (ZeRO's data-parallel group) with ``parallel.timeout_s``;
    DeepSpeed would create it with torch's default timeout (30 min on gloo)."""
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(
            ranks=range(info.world_size), timeout=datetime.timedelta(seconds=info.timeout_s)
        )


def deepspeed_config(
    *, precision: str, grad_clip: float | None, zero_stage: int, offload_optimizer: bool, world_size: int,
    on_gpu: bool, num_params: int, clip_in_engine: bool = True,
) -> dict:
    """The DeepSpeed config for one lenstrain run (the batch fields only satisfy DeepSpeed's checks).

    bf16 and fp16 use DeepSpeed's ``torch_autocast`` mode rather than its bf16/fp16 modes: weights,
    batch-norm statistics and optimizer state stay fp32 and autocast picks the precision per op, as
    with DDP. (Its bf16 mode casts the weights but not the buffers, which batch norm rejects.)

    The communication buckets are no larger than the model: ZeRO allocates its reduce bucket anew
    at each step, and its default of 5e8 elements costs seconds per step on CPU when
    ``torch.use_deterministic_algorithms`` fills fresh memory.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("parallel.offload_optimizer needs parallel.zero_stage 1, 2 or 3")
    bucket = int(min(5e8, max(num_params, 2**20)))
    zero: dict = {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(min(5e7, bucket))
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # the loop marks the boundary itself
        "train_batch_size": world_size,
        "gradient_clipping": float(grad_clip) if grad_clip and clip_in_engine else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the torch optimizer from optim.name
        "zero_force_ds_cpu_optimizer": False,  # offload keeps that optimizer: no compiled CPU Adam
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):  # torch autocast inside the engine (and a GradScaler for fp16)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, bf16, fp16")
    return config


class DeepSpeedBackend(DDPBackend):
    """ZeRO stages 0-3 through ``deepspeed.initialize``; the collectives are DDP's."""

    name = "deepspeed"
    options = ("zero_stage", "offload_optimizer")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, *, precision: str,
                 grad_clip: float | None, zero_stage: int = 1, offload_optimizer: bool = False):
        Backend.__init__(self, model, optimizer, info, precision="fp32", grad_clip=grad_clip)  # no GradScaler
        self.precision = precision
        self.zero_stage = zero_stage
        comm_backend = ensure_process_group(info)

        import deepspeed
        from deepspeed.utils import logger as ds_logger

        from lenstrain.parallel.deepspeed_files import ListedFilesCheckpointEngine

        ds_logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=comm_backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=info.timeout_s))
        clone_world_group(info)
        config = deepspeed_config(
            precision=precision, grad_clip=grad_clip, zero_stage=zero_stage, offload_optimizer=offload_optimizer,
            world_size=info.world_size, on_gpu=info.device.type == "cuda", clip_in_engine=zero_stage > 0,
            num_params=sum(p.numel() for p in model.parameters()),
        )
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.engine.checkpoint_engine = ListedFilesCheckpointEngine(self.engine._config)
        self.train_module = self.engine
        self._buffers_synced = False

    # --- the step ------------------------------------------------------------------------------
    def compiled_forward(self, backend: str = "inductor"):
        """The engine, its module compiled in place. Compiling the engine itself would trace DeepSpeed's own
        bookkeeping (timers, step counters) and recompile at every step."""
        self.model.compile(backend=backend)
        return self.engine

    def accumulating(self, last: bool):
        if not self._buffers_synced:  # once per step, before its first forward
            self._broadcast_buffers()
            self._buffers_synced = True
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers (batch-norm statistics) to every rank, as DDP does before each forward.

        DeepSpeed leaves each rank's buffers to drift apart, while its checkpoint keeps rank 0's.
        """
        if not self._distributed():
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buf in self.model.buffers():
            by_dtype.setdefault(buf.dtype, []).append(buf)
        for bufs in by_dtype.values():
            flat = _flatten_dense_tensors([b.detach() for b in bufs])
            device = flat.device
            flat = flat.to(self._comm_device())
            dist.broadcast(flat, src=0)
            for buf, value in zip(bufs, _unflatten_dense_tensors(flat.to(device), bufs), strict=True):
                buf.copy_(value)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, skip: bool | torch.Tensor = False) -> float | torch.Tensor:
        """One engine step; returns the global grad norm (inf when the update was skipped). (The engine
        reads its overflow check on the host, and without ZeRO a tensor ``skip`` is read here.)

        With ZeRO the engine itself skips an update whose gradients are not finite (which a
        non-finite loss gives) and clears them. A tensor ``skip`` also reaches the fused optimizers (Adam,
        AdamW, SGD) that ZeRO steps on each rank's partition, as their ``found_inf`` flag: their kernel leaves
        the fp32 partition as it was, which the engine then copies back to the weights, so a flagged step
        is skipped exactly even where its gradients are finite (RAdam and Lion rely on the engine's check).
        Without ZeRO this backend skips it.
        """
        self.engine.set_gradient_accumulation_boundary(True)
        self._buffers_synced = False
        if self.zero_stage == 0:
            return self._step_without_zero(skip)
        if torch.is_tensor(skip) and skip_kind(self.optimizer) == "found_inf":
            fill_momentum_buffers(self.optimizer, every=True)
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip.to(torch.float32)
            try:
                self.engine.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        else:
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return 0.0
        return norm.detach() if torch.is_tensor(norm) else float(norm)

    def _step_without_zero(self, skip: bool) -> float:
        """Without ZeRO the engine steps the torch optimizer and reports no norm: unscale and clip here."""
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)  # fp16 only
        if scaler is not None:
            scaler.unscale_(self.engine.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if skip:
            if scaler is not None:
                scaler.update()
            self.engine.zero_grad()
            return norm
        self.engine.step()
        return norm

    # --- state ---------------------------------------------------------------------------------
    def state_objects(self) -> dict[str, object]:
        """Nothing for rank 0 alone: the engine's collective checkpoint holds model, optimizer and scaler."""
        return {}

    def save_state(self, directory: Path, objects: dict[str, object]) -> None:
        """Collective: every rank writes its part of ``directory/deepspeed/``; rank 0 then writes ``objects``.

        A failed write raises its OSError after the engine's save has finished on every rank. (DeepSpeed
        copies its recovery script on rank 0 outside this path; a failure there leaves the other ranks
        at the engine's closing barrier until the collective timeout.)
        """
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_DIR, client_state={}, save_latest=False)
        self.engine.checkpoint_engine.raise_write_error()
        super().save_state(directory, objects)

    def load_state(self, directory: Path, objects: dict[str, object]) -> None:
        """Collective: every rank restores the weights and its optimizer partition, then ``objects``.

        A ZeRO checkpoint written by another world size is first converted to DeepSpeed's universal layout
        (whole parameters and optimizer states, see :func:`~lenstrain.parallel.deepspeed_files.write_universal`),
        which this world size then partitions its own way.
        """
        from lenstrain.parallel.deepspeed_files import saved_world_size

        saved = saved_world_size(directory)
        if self.zero_stage > 0 and saved is not None and saved != self.info.world_size:
            self._load_resharded(Path(directory), saved)
        else:
            self._load_engine(Path(directory))
        super().load_state(directory, objects)

    def _load_engine(self, directory: Path) -> None:
        """DeepSpeed's own load of the model and optimizer partitions (the scheduler is ours). Every pickle it
        may read is scanned first: a global outside :data:`lenstrain.checkpointing.safepickle.ALLOWED_GLOBALS` is refused."""
        from lenstrain.checkpointing.safepickle import CheckpointReadError, check_pickle_tree

        check_pickle_tree(directory / DEEPSPEED_DIR)
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_DIR, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        except CheckpointReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged partition fails in many ways
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointReadError(f"{directory / DEEPSPEED_DIR}: DeepSpeed cannot load it "
                                      f"({type(exc).__name__}: {first})") from None
        if path is None:
            raise CheckpointReadError(f"no DeepSpeed checkpoint in {directory / DEEPSPEED_DIR}")

    def _load_resharded(self, directory: Path, saved: int) -> None:
        """Rank 0 converts the checkpoint into ``checkpoints/.reshard-step-N/`` (beside it, on the run's shared
        file system), every rank loads its partition from there, and rank 0 removes it; the buffers come from
        the checkpoint itself. (``saved``: the world size that wrote it.)"""
        from lenstrain.parallel.deepspeed_files import (
            AllowlistedCheckpointEngine,
            saved_module_state,
            write_universal,
        )

        universal = directory.parent / f".reshard-{directory.name}"
        if self.info.is_main:
            shutil.rmtree(universal, ignore_errors=True)
            write_universal(directory, universal)
        self.barrier()
        listed_files, config = self.engine.checkpoint_engine, self.engine._config
        self.engine.checkpoint_engine = AllowlistedCheckpointEngine(config)  # files converted here from verified ones
        config.load_universal_checkpoint = True
        try:
            self._load_engine(universal)
        finally:
            self.engine.checkpoint_engine, config.load_universal_checkpoint = listed_files, False
            self.barrier()
            if self.info.is_main:
                shutil.rmtree(universal, ignore_errors=True)
        module = saved_module_state(directory)  # the universal layout leaves the buffers (batch-norm statistics) out
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if name in module:
                    buffer.copy_(module[name])
