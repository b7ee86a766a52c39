"""Validation metrics from gathered predictions (torchmetrics does the arithmetic)."""

from __future__ import annotations

import torch


def predictions_from_output(output: torch.Tensor, kind: str, loss: str) -> torch.Tensor:
    """Model output (B, K) to predictions: values (B,) for regression, class probabilities otherwise."""
    output = output.float()
    if kind == "regression":
        return output.squeeze(-1)
    if loss == "bce":
        p = torch.sigmoid(output.squeeze(-1))
        return torch.stack([1 - p, p], dim=-1)
    return torch.softmax(output, dim=-1)


def compute_metrics(pred: torch.Tensor, target: torch.Tensor, kind: str, num_classes: int = 0) -> dict[str, float]:
    """Regression: mse, mae, r2 in the target's own units. Classification: accuracy, auc."""
    # torchmetrics pulls in torchvision: imported here, not at start-up of every process.
    from torchmetrics.functional import accuracy, auroc, mean_absolute_error, mean_squared_error, r2_score

    if kind == "regression":
        pred, target = pred.double(), target.double()
        out = {"mse": float(mean_squared_error(pred, target)), "mae": float(mean_absolute_error(pred, target))}
        out["r2"] = float(r2_score(pred, target)) if len(target) > 1 and target.var() > 0 else float("nan")
        return out
    target = target.long()
    out = {"accuracy": float(accuracy(pred.argmax(-1), target, task="multiclass", num_classes=num_classes))}
    if len(torch.unique(target)) > 1:
        if num_classes == 2:
            out["auc"] = float(auroc(pred[:, 1], target, task="binary"))
        else:
            out["auc"] = float(auroc(pred, target, task="multiclass", num_classes=num_classes))
    return out
