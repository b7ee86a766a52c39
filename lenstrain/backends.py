"""Parallel backends behind one small interface: ``single``, ``ddp`` (and ``deepspeed``).

A backend owns how gradients are produced and applied across ranks. The loop calls
``accumulating(last)`` around each micro-step's forward, ``backward(loss)``, then ``step()``, and uses
``any_flag``/``mean``/``broadcast_object`` for the few collectives it needs. Checkpoints read the
unwrapped ``model`` and the ``optimizer`` through ``state_dict``-bearing objects.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from lenstrain.distributed import DistInfo


class Backend:
    name = "single"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, *,
                 precision: str, grad_clip: float | None):
        self.model = model  # unwrapped: what checkpoints and evaluation use
        self.optimizer = optimizer
        self.info = info
        self.precision = precision
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
        self.train_module: nn.Module = model  # what the forward pass calls

    # --- the step ------------------------------------------------------------------------------
    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.info.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def accumulating(self, last: bool):  # noqa: ARG002 - DDP skips the all-reduce until the last micro-step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, skip: bool = False) -> float:
        """Unscale, clip, apply the update (unless ``skip``) and zero the gradients; return the grad norm."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        if not skip:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # --- collectives ---------------------------------------------------------------------------
    def any_flags(self, flags: list[bool]) -> list[bool]:
        """For each flag, whether any rank raised it (one collective for all of them)."""
        return list(flags)

    def any_flag(self, flag: bool) -> bool:
        return self.any_flags([flag])[0]

    def mean(self, value: float) -> float:
        return value

    def broadcast_object(self, obj):
        return obj

    def gather_objects(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    # --- state ---------------------------------------------------------------------------------
    def state_objects(self) -> dict[str, object]:
        """Objects with ``state_dict`` to checkpoint, by fixed key; saved by rank 0 (replicated)."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, model, optimizer, info, *, precision, grad_clip, find_unused_parameters=False):
        super().__init__(model, optimizer, info, precision=precision, grad_clip=grad_clip)
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(model, device_ids=device_ids,
                                                        find_unused_parameters=find_unused_parameters)

    def accumulating(self, last: bool):
        if isinstance(self.train_module, DistributedDataParallel) and not last:
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def _distributed(self) -> bool:
        return self.info.world_size > 1 and dist.is_initialized()

    def any_flags(self, flags: list[bool]) -> list[bool]:
        if not self._distributed():
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def mean(self, value: float) -> float:
        if not self._distributed():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.info.world_size

    def broadcast_object(self, obj):
        if not self._distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if not self._distributed():
            return [obj]
        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._distributed():
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def build_backend(strategy: str, model, optimizer, info: DistInfo, *, precision: str, grad_clip,
                  find_unused_parameters: bool = False, **deepspeed_options) -> Backend:
    if strategy == "single":
        if info.world_size > 1:
            raise ValueError("parallel.strategy 'single' runs one process; use 'ddp' for several")
        return Backend(model, optimizer, info, precision=precision, grad_clip=grad_clip)
    if strategy == "ddp":
        return DDPBackend(model, optimizer, info, precision=precision, grad_clip=grad_clip,
                          find_unused_parameters=find_unused_parameters)
    if strategy == "deepspeed":
        from lenstrain.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, optimizer, info, precision=precision, grad_clip=grad_clip, **deepspeed_options)
    raise ValueError(f"unknown parallel.strategy {strategy!r}; valid: single, ddp, deepspeed")
