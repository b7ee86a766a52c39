"""DistributedDataParallel: the model replicated on every rank, gradients all-reduced (gloo or NCCL)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lenstrain.parallel.base import Backend, StepFlags


class DDPBackend(Backend):
    """Backend's step and state, with DDP's gradient all-reduce and real collectives (one rank: none)."""

    name = "ddp"
    multi_rank = True
    options = ("find_unused_parameters",)

    def __init__(self, model, optimizer, info, *, precision, grad_clip, find_unused_parameters=False):
        super().__init__(model, optimizer, info, precision=precision, grad_clip=grad_clip)
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
            )

    def accumulating(self, last: bool):
        if isinstance(self.train_module, DistributedDataParallel) and not last:
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def _distributed(self) -> bool:
        return self.info.world_size > 1 and dist.is_initialized()

    def reduce_flags(self, flags: torch.Tensor) -> StepFlags:
        """One all-reduce (MAX): with NCCL on the device, where the host does not wait for it; with gloo on a
        CPU copy, as the masks need the agreed flags."""
        if not self._distributed():
            return StepFlags(flags)
        flags = flags.to(self._comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return StepFlags(flags)

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
