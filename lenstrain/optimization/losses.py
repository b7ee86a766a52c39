"""Loss functions: the ``LOSSES`` table maps each name to the target kind it fits and its builder.

Each loss maps (model output (B, K), target) to a scalar. torch is imported where a loss is built,
so the config can read the table cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


class RegressionLoss:
    """A pointwise loss between the single output and the (scaled) target value."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output.float().squeeze(-1), target.float())


class BinaryCrossEntropy:
    """One logit per sample; label smoothing pulls the 0/1 targets towards 0.5."""

    def __init__(self, label_smoothing: float):
        self.smoothing = label_smoothing

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        t = target.float()
        if self.smoothing:
            t = t * (1 - self.smoothing) + 0.5 * self.smoothing
        return F.binary_cross_entropy_with_logits(output.float().squeeze(-1), t)


class CrossEntropy:
    """One logit per class."""

    def __init__(self, label_smoothing: float):
        self.smoothing = label_smoothing

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(output.float(), target.long(), label_smoothing=self.smoothing)


def _mse(huber_delta: float, label_smoothing: float) -> RegressionLoss:  # noqa: ARG001
    import torch.nn.functional as F

    return RegressionLoss(F.mse_loss)


def _mae(huber_delta: float, label_smoothing: float) -> RegressionLoss:  # noqa: ARG001
    import torch.nn.functional as F

    return RegressionLoss(F.l1_loss)


def _huber(huber_delta: float, label_smoothing: float) -> RegressionLoss:  # noqa: ARG001
    import torch.nn.functional as F

    return RegressionLoss(lambda pred, target: F.huber_loss(pred, target, delta=huber_delta))


def _bce(huber_delta: float, label_smoothing: float) -> BinaryCrossEntropy:  # noqa: ARG001
    return BinaryCrossEntropy(label_smoothing)


def _ce(huber_delta: float, label_smoothing: float) -> CrossEntropy:  # noqa: ARG001
    return CrossEntropy(label_smoothing)


@dataclass(frozen=True)
class LossSpec:
    kind: str  # the target kind it fits
    build: Callable[[float, float], Callable]  # (huber_delta, label_smoothing) -> loss
    one_output: bool  # one model output per sample (else one per class)


LOSSES: dict[str, LossSpec] = {
    "mse": LossSpec("regression", _mse, one_output=True),
    "mae": LossSpec("regression", _mae, one_output=True),
    "huber": LossSpec("regression", _huber, one_output=True),
    "bce": LossSpec("classification", _bce, one_output=True),
    "ce": LossSpec("classification", _ce, one_output=False),
}


def losses_for(kind: str) -> tuple[str, ...]:
    return tuple(name for name, spec in LOSSES.items() if spec.kind == kind)


def default_loss(kind: str, num_classes: int) -> str:
    if kind == "regression":
        return "mse"
    return "bce" if num_classes == 2 else "ce"


def num_outputs_for(loss: str, num_classes: int) -> int:
    return 1 if LOSSES[loss].one_output else num_classes


def make_loss(name: str, kind: str, num_classes: int, *, huber_delta: float = 1.0,
              label_smoothing: float = 0.0) -> Callable:
    """The loss ``name`` for a target of ``kind``; ValueError when it does not fit that target."""
    if name not in losses_for(kind):
        raise ValueError(f"train.loss {name!r} does not fit a {kind} target; valid: {', '.join(losses_for(kind))}")
    if name == "bce" and num_classes != 2:
        raise ValueError(f"train.loss 'bce' needs 2 classes, the target has {num_classes}; use 'ce'")
    return LOSSES[name].build(huber_delta, label_smoothing)


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
