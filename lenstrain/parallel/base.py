"""The backend interface, and the single-process backend that defines it.

A backend owns how gradients are produced and applied across ranks, and how the training state
reaches a checkpoint. The loop calls ``accumulating(last)`` around each micro-step's forward,
``backward(loss)``, then ``step()``, and uses ``reduce_flags``/``mean``/``broadcast_object``/
``gather_objects``/``barrier`` for the few collectives it needs.

Nothing on a step's path reads the device: ``reduce_flags`` leaves the agreed flags on the device
(with a copy on its way to the host, read a step later), ``step(skip=tensor)`` skips the update on
the device (:mod:`lenstrain.parallel.skip`) and returns the gradient norm as a device tensor. The checkpointer calls
``save_state``/``load_state`` on every rank. Evaluation reads the unwrapped ``model``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.checkpointing.stateio import load_state_file, save_state_file
from lenstrain.parallel.distributed import DistInfo
from lenstrain.parallel.skip import SkippableStep, fill_momentum_buffers, poison_gradients


class Backend:
    """One process: the step under autocast (with a GradScaler for fp16), collectives that return their input."""

    name = "single"
    multi_rank = False  # whether it runs on several ranks
    options: tuple[str, ...] = ()  # keyword options of its constructor beyond precision and grad_clip

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
        *,
        precision: str,
        grad_clip: float | None,
    ):
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

    def compiled_forward(self, backend: str = "inductor"):
        """The forward pass compiled with ``torch.compile`` (``model.compile``): here the module the loop calls."""
        return torch.compile(self.train_module, backend=backend)

    def accumulating(self, last: bool):  # noqa: ARG002 - DDP skips the all-reduce until the last micro-step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if getattr(self, "_grads_spent", False):  # see _release_grads
            self.optimizer.zero_grad(set_to_none=True)
            self._grads_spent = False
        self.scaler.scale(loss).backward()

    def _release_grads(self) -> None:
        """Drop the gradients once the update has used them: at once on a GPU, where that lowers the peak
        memory of the next forward pass; on a CPU just before the next backward, as a bare loop does, since
        there the allocator hands freshly freed gradient memory back to the OS and the next backward pays
        page faults for it (+4% of a resnet18 CPU step)."""
        if self.info.device.type == "cuda":
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self._grads_spent = True

    def step(self, skip: bool | torch.Tensor = False) -> torch.Tensor:
        """Unscale, clip, apply the update (unless ``skip``) and release the gradients; return the grad norm
        (a 0-dim tensor on the device).

        ``skip`` as a 0-dim bool tensor on the device skips the update there, exactly, without reading
        it: see :mod:`lenstrain.parallel.skip`. With fp16 it makes the gradients non-finite, and
        GradScaler skips the step as on an overflow (reading its check on the host unless the optimizer
        is fused).
        """
        if torch.is_tensor(skip) and self.scaler.is_enabled():
            poison_gradients(self.optimizer, skip)
            skip = False
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = (
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            if params
            else torch.zeros((), device=self.info.device)
        )
        if torch.is_tensor(skip):
            self.skippable.step(skip)
        elif not skip:
            fill_momentum_buffers(self.optimizer)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self._release_grads()
        return norm.detach()

    @property
    def skippable(self) -> SkippableStep:
        if getattr(self, "_skippable", None) is None:
            self._skippable = SkippableStep(self.optimizer)
        return self._skippable

    def settle_skip(self, skipped: bool) -> None:
        """The host's reading of the last skippable step's ``skip`` (before the next update)."""
        if getattr(self, "_skippable", None) is not None:
            self._skippable.settle(skipped)

    # --- collectives ---------------------------------------------------------------------------
    def reduce_flags(self, flags: torch.Tensor) -> StepFlags:
        """For each entry of a 1-d float tensor of 0/1 flags on the device, whether any rank raised it
        (one collective for all of them, queued, not waited for)."""
        return StepFlags(flags)

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
        """Objects with ``state_dict`` that this backend keeps in step, by fixed key."""
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def save_state(self, directory: Path, objects: dict[str, object]) -> None:
        """Collective: write ``objects`` into the checkpoint ``directory``, as ``KEY.pt`` files.

        Every rank holds the same state here, so rank 0 alone writes it. A failed write raises its OSError.
        """
        if self.info.is_main:
            for key, obj in objects.items():
                save_state_file(obj.state_dict(), Path(directory) / f"{key}.pt")

    def load_state(self, directory: Path, objects: dict[str, object]) -> None:
        """Collective: restore ``objects`` from the checkpoint ``directory`` (plain data only)."""
        for key, obj in objects.items():
            where = "cpu" if key == "model" else self.info.device
            obj.load_state_dict(load_state_file(Path(directory) / f"{key}.pt", map_location=where))


class StepFlags:
    """A step's flags, agreed across ranks, and a copy of them on its way to the host.

    ``on_device`` serves masks on the device. On a GPU, ``read()`` waits only for the copy queued with the
    flags: read a step later, it does not wait for the step queued since.
    """

    def __init__(self, on_device: torch.Tensor):
        self.on_device = on_device
        self._event = None
        if on_device.device.type == "cuda":
            self._host = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
            self._host.copy_(on_device, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = on_device

    def read(self) -> list[bool]:
        if self._event is not None:
            self._event.synchronize()
        return [bool(v > 0) for v in self._host.numpy()]
