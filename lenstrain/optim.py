"""Optimizers and learning-rate schedules, built from config."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weight matrices and kernels only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, lr=cfg.lr, betas=cfg.betas, decoupled_weight_decay=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    raise ValueError(f"unknown optim.name {cfg.name!r}")


class PlateauScheduler:
    """ReduceLROnPlateau with warmup, stepped per train step and told each validation metric."""

    def __init__(self, optimizer, cfg, mode: str):
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


def build_scheduler(cfg, optimizer, total_steps: int) -> LRScheduler | PlateauScheduler:
    total_steps = max(total_steps, 1)
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.name == "plateau":
        return PlateauScheduler(optimizer, cfg, cfg.mode)
    if cfg.name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps + 1, pct_start=cfg.pct_start)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** ((step - warmup) // cfg.step_size)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
