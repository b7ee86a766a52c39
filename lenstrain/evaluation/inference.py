"""Running a model over a split: :func:`predict` (with test-time rotation averaging) and
:func:`evaluate` (metrics over a split, every sample once across ranks), for validation, ``eval`` and
``predict`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lenstrain.config.schema import LenstrainConfig
from lenstrain.evaluation.metrics import compute_metrics, predictions_from_output
from lenstrain.parallel import Backend
from lenstrain.run.build import Task, build_eval_batches

MAX_ROTATIONS = 4  # 90-degree turns: a fifth would repeat the first


@dataclass
class Outputs:
    """Raw model outputs (N, K) with the targets and split indices of their samples."""

    output: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor

    @classmethod
    def concat(cls, parts: list[Outputs], width: int) -> Outputs:
        if not parts:
            return cls(torch.empty(0, width), torch.empty(0), torch.empty(0))
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("output", "target", "index")))

    def in_index_order(self) -> Outputs:
        order = torch.argsort(self.index)
        return Outputs(self.output[order], self.target[order], self.index[order])


@torch.no_grad()
def predict(model: nn.Module, backend: Backend, batches, rotations: int = 1, width: int = 1) -> Outputs:
    """The model's outputs on ``batches``, averaged over ``rotations`` turns of 90 degrees, in eval mode."""
    was_training = model.training
    model.eval()
    parts = []
    for batch in batches:
        x = batch["image"].to(backend.info.device)
        with backend.autocast():
            out = sum(model(torch.rot90(x, k, dims=(-2, -1))).float() for k in range(rotations)) / rotations
        parts.append(Outputs(out.cpu(), batch["target"], batch["index"]))
    model.train(was_training)
    return Outputs.concat(parts, width)


def decode(task: Task, outputs: Outputs) -> dict[str, torch.Tensor]:
    """``pred`` (values in the target's units, or class probabilities), ``true`` and ``index``."""
    pred = predictions_from_output(outputs.output, task.target.kind, task.loss_name)
    true = outputs.target
    if task.target.kind == "regression":
        pred, true = task.target.decode(pred), task.target.decode(true)
    return {"pred": pred, "true": true, "index": outputs.index}


def evaluate(model: nn.Module, backend: Backend, cfg: LenstrainConfig, task: Task, loss_fn, split: str,
             rotations: int = 1) -> tuple[dict[str, float], dict]:
    """Metrics on ``split`` (``{split}/{name}``, on every rank), every sample once across ranks; also the
    decoded predictions, gathered on rank 0 (empty elsewhere)."""
    batches = build_eval_batches(cfg, task, split, backend.info)
    mine = predict(model, backend, batches, rotations, task.num_outputs)
    gathered = backend.gather_objects((mine.output, mine.target, mine.index))
    metrics: dict[str, float] = {}
    result: dict = {}
    if backend.info.is_main:
        outputs = Outputs.concat([Outputs(*part) for part in gathered], task.num_outputs).in_index_order()
        metrics["loss"] = float(loss_fn(outputs.output, outputs.target))
        result = decode(task, outputs)
        metrics.update(compute_metrics(result["pred"], result["true"], task.target.kind, task.num_classes))
    metrics = backend.broadcast_object(metrics)
    return {f"{split}/{k}": v for k, v in metrics.items()}, result
