"""Checks of a config against its shard set, run before any work starts.

The config's own validation cannot see the data; these checks can: the target exists, the loss
fits it, the model accepts its keyword arguments, the global batch fits the train split, and the
metric that picks the best checkpoint is one that validation produces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lenstrain.config import LenstrainConfig
from lenstrain.losses import build_loss, default_loss, num_outputs_for
from lenstrain.models import create_model
from shards.manifest import Manifest

REGRESSION_METRICS = ("loss", "mse", "mae", "r2")
CLASSIFICATION_METRICS = ("loss", "accuracy", "auc")


def preflight(cfg: LenstrainConfig, manifest: Manifest, world_size: int = 1) -> list[tuple[str, str]]:
    """(dotted path, problem) for each way ``cfg`` cannot train on ``manifest``."""
    errors: list[tuple[str, str]] = []
    name = cfg.data.target or manifest.primary_target
    if name not in manifest.targets:
        errors.append(("data.target", f"{name!r} is not a target of the shard set; valid choices: "
                       f"{', '.join(manifest.targets)}"))
        return errors
    target = manifest.targets[name]
    num_classes = len(target.classes or [])
    loss = cfg.train.loss if cfg.train.loss != "auto" else default_loss(target.kind, num_classes)
    try:
        build_loss(loss, target.kind, num_classes, huber_delta=cfg.train.huber_delta,
                   label_smoothing=cfg.train.label_smoothing)
    except ValueError as exc:
        errors.append(("train.loss", str(exc).replace("train.loss ", "")))
        loss = default_loss(target.kind, num_classes)  # to go on checking the rest

    train = manifest.splits.get("train")
    n_train = train.count if train else 0
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    if global_batch > n_train:
        errors.append(("data.batch_size", f"a global batch of {global_batch} samples ({cfg.data.batch_size} x "
                       f"{world_size} rank(s) x {cfg.train.grad_accum} accumulation) exceeds the {n_train} train "
                       f"samples; lower data.batch_size"))

    metrics = REGRESSION_METRICS if target.kind == "regression" else CLASSIFICATION_METRICS
    valid = ", ".join(f"{cfg.data.val_split}/{m}" for m in metrics)
    for path, metric in (("checkpoint.best_metric", cfg.checkpoint.best_metric),
                         ("schedule.metric", cfg.schedule.metric if cfg.schedule.name == "plateau" else None),
                         ("train.early_stopping.metric",
                          cfg.train.early_stopping.metric if cfg.train.early_stopping else None)):
        if metric and metric not in {f"{cfg.data.val_split}/{m}" for m in metrics}:
            errors.append((path, f"{metric!r} is not measured for a {target.kind} target; valid choices: {valid}"))

    shape = manifest.image.shape
    try:
        with torch.device("meta"):
            create_model(cfg.model.name, in_channels=shape[0], num_outputs=num_outputs_for(target.kind, loss, num_classes),
                         image_size=shape[1], **cfg.model.kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(("model.kwargs", f"{cfg.model.name}: {exc}"))
    except Exception:  # noqa: BLE001 - some layers cannot be built on the meta device; training will tell
        pass
    return errors


def has_split(manifest: Manifest, split: str) -> bool:
    return split in manifest.splits and manifest.splits[split].count > 0


def shard_dir(cfg: LenstrainConfig, base: Path | None = None) -> Path:
    path = Path(cfg.data.shards)
    return path if path.is_absolute() or base is None else base / path
