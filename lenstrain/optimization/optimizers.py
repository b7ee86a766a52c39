"""Optimizers and learning-rate schedules: the ``OPTIMIZERS`` and ``SCHEDULES`` tables map each config
name to its builder. torch is imported where a builder runs, so the config can read the tables cheaply.

Adam, AdamW and SGD are built ``fused`` (one kernel per device for the whole update, on CPU and CUDA) where
every parameter allows it: besides being faster, fused optimizers skip a step on a device-side flag,
which is how the loop skips a non-finite loss without a host sync (:mod:`lenstrain.parallel.skip`).
RAdam and Lion have no fused form; their skipped steps are masked, at the cost of a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weight matrices and kernels only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------ optimizers
# Each builder: (parameter groups, the optim section) -> optimizer.

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam, AdamW and SGD kernels run


def fusable(groups) -> bool:
    """Whether every parameter of ``groups`` can go through a fused kernel (floating point, on CPU or CUDA)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


def _adam(groups, cfg):
    from torch.optim import Adam

    return Adam(groups, lr=cfg.lr, betas=cfg.betas, fused=fusable(groups) or None)


def _adamw(groups, cfg):
    from torch.optim import AdamW

    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fusable(groups) or None)


def _radam(groups, cfg):
    from torch.optim import RAdam

    return RAdam(groups, lr=cfg.lr, betas=cfg.betas, decoupled_weight_decay=True)


def _sgd(groups, cfg):
    from torch.optim import SGD

    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fusable(groups) or None)


def _lion(groups, cfg):
    from lion_pytorch import Lion

    return Lion(groups, lr=cfg.lr, betas=cfg.betas)


OPTIMIZERS: dict[str, Callable] = {
    "adam": _adam,
    "adamw": _adamw,
    "radam": _radam,
    "sgd": _sgd,
    "lion": _lion,
}


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay), cfg)


# ------------------------------------------------------------------------------------ schedules
# Each builder: (the schedule section, optimizer, total steps) -> scheduler.


class PlateauScheduler:
    """ReduceLROnPlateau with warmup, stepped per train step and told each validation metric."""

    def __init__(self, optimizer, cfg, mode: str):
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        self.optimizer = optimizer
        self.warmup = cfg.warmup_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.plateau = ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience)
        self.steps = 0
        self.metric = cfg.metric
        self.step()

    def step(self) -> None:
        if self.steps < self.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * (self.steps + 1) / self.warmup
        self.steps += 1

    def observe(self, metrics: dict) -> None:
        if self.metric in metrics and self.steps >= self.warmup:
            self.plateau.step(metrics[self.metric])

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "plateau": self.plateau.state_dict(), "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.base_lrs = state["steps"], state["base_lrs"]
        self.plateau.load_state_dict(state["plateau"])


def _plateau(cfg, optimizer, total_steps: int) -> PlateauScheduler:  # noqa: ARG001
    return PlateauScheduler(optimizer, cfg, cfg.mode)


def _onecycle(cfg, optimizer, total_steps: int):
    from torch.optim.lr_scheduler import OneCycleLR

    max_lrs = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps + 1, pct_start=cfg.pct_start)


def _after_warmup(shape: Callable[[object, int, int], float]) -> Callable:
    """A LambdaLR schedule: linear warmup, then ``shape(cfg, steps since warmup, steps after warmup)``."""

    def build(cfg, optimizer, total_steps: int):
        from torch.optim.lr_scheduler import LambdaLR

        warmup = min(cfg.warmup_steps, total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return shape(cfg, step - warmup, total_steps - warmup)

        return LambdaLR(optimizer, factor)

    return build


def _constant(cfg, step: int, span: int) -> float:  # noqa: ARG001
    return 1.0


def _step(cfg, step: int, span: int) -> float:  # noqa: ARG001
    return cfg.gamma ** (step // cfg.step_size)


def _cosine(cfg, step: int, span: int) -> float:
    progress = min(1.0, step / max(1, span))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable] = {
    "constant": _after_warmup(_constant),
    "cosine": _after_warmup(_cosine),
    "onecycle": _onecycle,
    "step": _after_warmup(_step),
    "plateau": _plateau,
}


def build_scheduler(cfg, optimizer, total_steps: int):
    return SCHEDULES[cfg.name](cfg, optimizer, max(total_steps, 1))
