"""Loss functions, built from config. Each maps (model output (B, K), target) to a scalar."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

REGRESSION_LOSSES = ("mse", "mae", "huber")
CLASSIFICATION_LOSSES = ("bce", "ce")


def default_loss(kind: str, num_classes: int) -> str:
    if kind == "regression":
        return "mse"
    return "bce" if num_classes == 2 else "ce"


def num_outputs_for(kind: str, loss: str, num_classes: int) -> int:
    if kind == "regression" or loss == "bce":
        return 1
    return num_classes


class LensingLoss(nn.Module):
    def __init__(self, name: str, *, huber_delta: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.name, self.delta, self.smoothing = name, huber_delta, label_smoothing

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = output.float()
        if self.name in REGRESSION_LOSSES:
            pred = output.squeeze(-1)
            target = target.float()
            if self.name == "mse":
                return F.mse_loss(pred, target)
            if self.name == "mae":
                return F.l1_loss(pred, target)
            return F.huber_loss(pred, target, delta=self.delta)
        if self.name == "bce":
            t = target.float()
            if self.smoothing:
                t = t * (1 - self.smoothing) + 0.5 * self.smoothing
            return F.binary_cross_entropy_with_logits(output.squeeze(-1), t)
        return F.cross_entropy(output, target.long(), label_smoothing=self.smoothing)


def build_loss(name: str, kind: str, num_classes: int, *, huber_delta: float, label_smoothing: float) -> LensingLoss:
    if name == "auto":
        name = default_loss(kind, num_classes)
    if kind == "regression" and name not in REGRESSION_LOSSES:
        raise ValueError(f"train.loss {name!r} does not fit a regression target; valid: {', '.join(REGRESSION_LOSSES)}")
    if kind == "classification" and name not in CLASSIFICATION_LOSSES:
        raise ValueError(f"train.loss {name!r} does not fit a classification target; valid: bce, ce")
    if name == "bce" and num_classes != 2:
        raise ValueError(f"train.loss 'bce' needs 2 classes, the target has {num_classes}; use 'ce'")
    return LensingLoss(name, huber_delta=huber_delta, label_smoothing=label_smoothing)


def weight_penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | None:
    """Optional L1/L2 penalties on weight tensors (not biases or norm parameters)."""
    if not (l1 or l2):
        return None
    total = None
    for p in model.parameters():
        if p.ndim < 2 or not p.requires_grad:
            continue
        term = 0.0
        if l1:
            term = term + l1 * p.abs().sum()
        if l2:
            term = term + l2 * p.pow(2).sum()
        total = term if total is None else total + term
    return total
