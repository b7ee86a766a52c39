"""Validation metrics: the ``METRICS`` table (name, target kinds, direction, how to compute) and the one
rule for "better" that the loop, early stopping, the plateau schedule and checkpoint choice share.

torch and torchmetrics are imported where they are used, so the config can read the table cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REGRESSION, CLASSIFICATION = "regression", "classification"


@dataclass(frozen=True)
class Metric:
    kinds: tuple[str, ...]
    higher_is_better: bool
    # (pred, target, num_classes) -> value, or None where the split cannot measure it; None: the loss itself
    compute: Callable[[torch.Tensor, torch.Tensor, int], float | None] | None = None


def _mse(pred, target, num_classes: int) -> float:  # noqa: ARG001
    from torchmetrics.functional import mean_squared_error

    return float(mean_squared_error(pred, target))


def _mae(pred, target, num_classes: int) -> float:  # noqa: ARG001
    from torchmetrics.functional import mean_absolute_error

    return float(mean_absolute_error(pred, target))


def _r2(pred, target, num_classes: int) -> float:  # noqa: ARG001
    from torchmetrics.functional import r2_score

    return float(r2_score(pred, target)) if len(target) > 1 and target.var() > 0 else math.nan


def _accuracy(pred, target, num_classes: int) -> float:
    from torchmetrics.functional import accuracy

    return float(accuracy(pred.argmax(-1), target, task="multiclass", num_classes=num_classes))


def _auc(pred, target, num_classes: int) -> float | None:
    import torch
    from torchmetrics.functional import auroc

    if len(torch.unique(target)) < 2:
        return None  # one class only: no ROC curve
    if num_classes == 2:
        return float(auroc(pred[:, 1], target, task="binary"))
    return float(auroc(pred, target, task="multiclass", num_classes=num_classes))


METRICS: dict[str, Metric] = {
    "loss": Metric((REGRESSION, CLASSIFICATION), higher_is_better=False),
    "mse": Metric((REGRESSION,), higher_is_better=False, compute=_mse),
    "mae": Metric((REGRESSION,), higher_is_better=False, compute=_mae),
    "r2": Metric((REGRESSION,), higher_is_better=True, compute=_r2),
    "accuracy": Metric((CLASSIFICATION,), higher_is_better=True, compute=_accuracy),
    "auc": Metric((CLASSIFICATION,), higher_is_better=True, compute=_auc),
}


def metric_names(kind: str) -> tuple[str, ...]:
    """The metrics validation reports for a target of ``kind``, in report order."""
    return tuple(name for name, metric in METRICS.items() if kind in metric.kinds)


def mode_for(metric: str) -> str | None:
    """``min`` or ``max`` for a reported metric such as ``val/auc`` (judged by its last path component);
    None for a name the table does not know."""
    known = METRICS.get(metric.rsplit("/", 1)[-1])
    if known is None:
        return None
    return "max" if known.higher_is_better else "min"


def better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best``: a non-finite value never does, anything finite beats no best (None
    or non-finite), and a tie does not (the first to reach a value keeps it)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def predictions_from_output(output: torch.Tensor, kind: str, loss: str) -> torch.Tensor:
    """Model output (B, K) to predictions: values (B,) for regression, class probabilities otherwise."""
    import torch

    output = output.float()
    if kind == REGRESSION:
        return output.squeeze(-1)
    if loss == "bce":
        p = torch.sigmoid(output.squeeze(-1))
        return torch.stack([1 - p, p], dim=-1)
    return torch.softmax(output, dim=-1)


def compute_metrics(pred: torch.Tensor, target: torch.Tensor, kind: str, num_classes: int = 0) -> dict[str, float]:
    """Every metric of the table for ``kind`` but the loss; regression ones in the target's own units."""
    pred, target = (pred.double(), target.double()) if kind == REGRESSION else (pred, target.long())
    out = {}
    for name in metric_names(kind):
        compute = METRICS[name].compute
        value = compute(pred, target, num_classes) if compute is not None else None
        if value is not None:
            out[name] = value
    return out
