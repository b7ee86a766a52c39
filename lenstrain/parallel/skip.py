"""An optimizer step that a 0-dim bool tensor on the device skips exactly, without the host reading it.

A step whose loss is not finite must leave the weights and the optimizer state exactly as they were,
yet the host must not wait to read that flag. Two ways, chosen per optimizer by :func:`skip_kind`:

- ``found_inf`` (Adam, AdamW and SGD, which ``lenstrain.optimization.optimizers`` builds ``fused``): the fused kernels take
  a device-side ``found_inf`` flag, the same one ``GradScaler`` hands them, and return at once when it
  is set; Adam's step counts are counted back on the device. No copy: the flag costs nothing.
- ``masked`` (RAdam, Lion, and any optimizer not fused): :class:`MaskedUpdate` copies the parameters
  and the optimizer state before the step and puts the copy back on the device where the flag is set.
  It costs one copy of the parameters and the optimizer state per step.

With fp16 the GradScaler already skips a step whose gradients are not finite (and reads its check on
the host, unless the optimizer is fused); :func:`poison_gradients` makes a non-finite loss one of those.
Under DeepSpeed ZeRO the flag reaches the fused optimizer that steps each partition the same way
(``DeepSpeedBackend.step``); with RAdam or Lion there, DeepSpeed's own overflow check (non-finite
gradients, read on the host) is what skips.
"""

from __future__ import annotations

import contextlib

import torch


def skip_kind(optimizer: torch.optim.Optimizer) -> str:
    """``found_inf`` where the optimizer skips on a device flag by itself, else ``masked``."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return "masked"
    # see fill_momentum_buffers: a zero buffer stands for a fresh one only without dampening
    sgd = isinstance(optimizer, torch.optim.SGD)
    dampened = sgd and any(g["momentum"] and g["dampening"] for g in optimizer.param_groups)
    return "masked" if dampened else "found_inf"


def fill_momentum_buffers(optimizer: torch.optim.Optimizer, every: bool = False) -> None:
    """Give fused SGD a zero momentum buffer for every parameter about to be stepped that has none.

    Fused SGD's first step allocates its buffers with ``empty_like`` and lets the kernel fill them; a
    step skipped by ``found_inf`` leaves them uninitialised and kept. A zero buffer gives the first
    step's buffer, the gradient, bit for bit (``momentum * 0 + grad``, without dampening). ``every``: all
    parameters, also those without a gradient yet (ZeRO's partitions, whose gradients appear inside the
    engine's step, and all of which it steps).
    """
    if not isinstance(optimizer, torch.optim.SGD) or not optimizer.defaults.get("fused"):
        return
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for p in group["params"]:
            if (every or p.grad is not None) and optimizer.state[p].get("momentum_buffer") is None:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)


def poison_gradients(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Make one gradient element NaN where ``skip`` is set (one element written, on the device), so that
    GradScaler's own inf check skips the step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                first = p.grad.view(-1)[:1]
                torch.where(skip, torch.full_like(first, float("nan")), first, out=first)
                return


class SkippableStep:
    """``step(skip)``: the optimizer's step, skipped exactly where ``skip`` (a 0-dim bool tensor) is set."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.kind = skip_kind(optimizer)
        self.masked = MaskedUpdate(optimizer) if self.kind == "masked" else None

    def step(self, skip: torch.Tensor) -> None:
        if self.masked is not None:
            with self.masked.masking(skip):
                self.optimizer.step()
            return
        fill_momentum_buffers(self.optimizer)
        self.optimizer.grad_scale, self.optimizer.found_inf = None, skip.to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf

    def settle(self, skipped: bool) -> None:
        """The host's reading of the last step's ``skip``, before the next step."""
        if self.masked is not None:
            self.masked.settle(skipped)


class MaskedUpdate:
    """An optimizer step that a bool tensor on the device can undo, without the host reading it.

    Before the step the parameters and the optimizer state are copied (into buffers kept from step to
    step, one batched copy); after it, each tensor on the mask's device takes back its copy where the
    mask is true (``torch.where``, exact). State the optimizer keeps elsewhere (Adam's step counts on
    the CPU beside GPU parameters) is put back by ``settle(True)`` once the host has read the mask,
    which the loop does before the next update. The cost: one copy of the parameters and the
    optimizer state per step, in memory and in time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._buffers: list[torch.Tensor] = []
        self._host_saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _tensors(self) -> list[torch.Tensor]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out.append(p.data)
                out.extend(v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v))
        return out

    @contextlib.contextmanager
    def masking(self, skip: torch.Tensor):
        tensors = self._tensors()
        known = {t.data_ptr() for t in tensors}
        on_device = [t for t in tensors if t.device == skip.device]
        self._host_saved = [(t, t.clone()) for t in tensors if t.device != skip.device]
        if [(b.shape, b.dtype) for b in self._buffers] != [(t.shape, t.dtype) for t in on_device]:
            self._buffers = [torch.empty_like(t) for t in on_device]  # the first step, or new state
        if on_device:
            torch._foreach_copy_(self._buffers, on_device)
        yield
        for before, tensor in zip(self._buffers, on_device, strict=True):
            torch.where(skip, before, tensor, out=tensor)
        # State the step created (its first) goes back to zeros, which the optimizers read as fresh.
        for tensor in (t for t in self._tensors() if t.data_ptr() not in known):
            if tensor.device == skip.device:
                tensor.masked_fill_(skip, 0)
            else:
                self._host_saved.append((tensor, torch.zeros_like(tensor)))

    def settle(self, skipped: bool) -> None:
        if skipped:
            for tensor, before in self._host_saved:
                tensor.copy_(before)
        self._host_saved = []
