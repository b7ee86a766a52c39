"""The builders: the parts of a run, made from its config, for training, ``eval``, ``predict`` and ``lr-find``.

A :class:`Task` is what the shard set asks of the model (the target, its loss, the output width);
the other builders make the model, its loss, the parallel backend and the data from a config and a task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lenstrain.config.schema import ConfigError, LenstrainConfig, TrainConfig
from lenstrain.data.loader import (
    BatchBuilder,
    Cursor,
    OptionalLabels,
    SequentialOrder,
    TargetTransform,
    TrainStream,
    eval_batches,
)
from lenstrain.models import create_model
from lenstrain.optimization.losses import default_loss, make_loss, num_outputs_for
from lenstrain.parallel import Backend, build_backend
from lenstrain.parallel.distributed import DistInfo
from shards.manifest import Manifest, load_manifest
from shards.reader import ShardReader


@dataclass(frozen=True)
class Task:
    """What the shard set asks of the model: the target, its loss and the output width."""

    manifest: Manifest
    target: TargetTransform
    loss_name: str

    @property
    def num_classes(self) -> int:
        return len(self.target.classes)

    @property
    def num_outputs(self) -> int:
        return num_outputs_for(self.loss_name, self.num_classes)


def task_for(cfg: LenstrainConfig, manifest: Manifest) -> Task:
    """The task of ``cfg`` on ``manifest``; ValueError for a target the shard set lacks."""
    target = TargetTransform.from_manifest(manifest, cfg.data.target, cfg.data.target_scaling)
    loss = cfg.train.loss if cfg.train.loss != "auto" else default_loss(target.kind, len(target.classes))
    return Task(manifest, target, loss)


def build_task(cfg: LenstrainConfig) -> Task:
    return task_for(cfg, load_manifest(cfg.data.shards))


def build_loss(train: TrainConfig, task: Task):
    """The loss of ``train.loss`` for the task's target; ValueError when it does not fit the target."""
    return make_loss(task.loss_name, task.target.kind, task.num_classes, huber_delta=train.huber_delta,
                     label_smoothing=train.label_smoothing)


def build_model(cfg: LenstrainConfig, task: Task, info: DistInfo) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    shape = task.manifest.image.shape
    model = create_model(cfg.model.name, in_channels=shape[0], num_outputs=task.num_outputs,
                         image_size=shape[1], **cfg.model.kwargs)
    model = model.to(info.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_parallel(cfg: LenstrainConfig, model: nn.Module, optimizer, info: DistInfo) -> Backend:
    """The backend of ``parallel.strategy`` around ``model`` and ``optimizer``."""
    p = cfg.parallel
    return build_backend(p.strategy, model, optimizer, info, precision=resolve_precision(cfg.train.precision,
                         info.device), grad_clip=cfg.train.grad_clip, find_unused_parameters=p.find_unused_parameters,
                         zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer)


def single_process(cfg: LenstrainConfig, model: nn.Module, optimizer=None) -> Backend:
    """A one-process backend on the best device here, for ``eval``, ``predict`` and ``lr-find``."""
    return Backend(model, optimizer, local_info(), precision=resolve_precision(cfg.train.precision, local_device()),
                   grad_clip=cfg.train.grad_clip)


def local_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def local_info() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=local_device())


# ------------------------------------------------------------------------------------ data


def augment_place(cfg: LenstrainConfig, device: torch.device) -> str:
    """Where training batches are augmented (``data.augment.device``): ``cpu`` (the loader workers) or
    ``device`` (the training process, on ``device``); ``auto`` is ``device`` on a GPU."""
    place = cfg.data.augment.device
    if place == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return place


def build_builder(cfg: LenstrainConfig, task: Task, split: str, augment: bool,
                  augment_device: str = "cpu") -> tuple[BatchBuilder, int]:
    """The batch builder of one split (normalised as ``data.normalize`` says) and the split's size."""
    reader = ShardReader(cfg.data.shards, split, manifest=task.manifest)
    stats = task.manifest.image.stats
    builder = BatchBuilder(reader, task.target, seed=cfg.seed, normalize=cfg.data.normalize,
                           mean=stats.mean if stats else 0.0, std=stats.std if stats else 1.0,
                           rotate=augment and cfg.data.augment.rotate, flip=augment and cfg.data.augment.flip,
                           augment_device=augment_device)
    return builder, len(reader)


def build_eval_batches(cfg: LenstrainConfig, task: Task, split: str, info: DistInfo, *,
                       optional_labels: bool = False):
    """This rank's unaugmented batches of ``split``; with ``optional_labels``, samples without the
    target read as NaN (regression) or -1 (classification) rather than failing."""
    builder, n = build_builder(cfg, task, split, augment=False)
    if optional_labels:
        builder.target = OptionalLabels(task.target)
    return eval_batches(builder, n, rank=info.rank, world=info.world_size,
                        batch=cfg.data.val_batch_size or cfg.data.batch_size, workers=min(cfg.data.workers, 2),
                        worker_kind=cfg.data.worker_kind)


def build_stream_builder(cfg: LenstrainConfig, task: Task, augment_device: str = "cpu"):
    """The batch builder of ``data.stream`` (rendering each sample, prepared as ``data.shards``' own images) and
    its epoch size; :class:`ConfigError` if the stream is invalid or disagrees with the shard set."""
    from lenstrain.data.stream import StreamBatchBuilder, check_stream

    plan, problems = check_stream(cfg, task.manifest)
    if problems:
        raise ConfigError(problems=problems)
    stats = task.manifest.image.stats
    builder = StreamBatchBuilder(plan, task.target, dtype=task.manifest.image.dtype, seed=cfg.seed,
                                 normalize=cfg.data.normalize, mean=stats.mean if stats else 0.0,
                                 std=stats.std if stats else 1.0, rotate=cfg.data.augment.rotate,
                                 flip=cfg.data.augment.flip, augment_device=augment_device)
    return builder, cfg.data.stream.epoch_size


def build_train_stream(cfg: LenstrainConfig, task: Task, info: DistInfo, cursor: Cursor | None, log) -> TrainStream:
    """The training batches: the train split of ``data.shards``, or with ``data.stream`` fresh simulations."""
    place = augment_place(cfg, info.device)
    if cfg.data.stream is not None:
        builder, n = build_stream_builder(cfg, task, place)
        if cfg.data.workers:
            builder.warm()  # before the workers start: processes inherit the built models, threads share them
        order = SequentialOrder(n)
    else:
        builder, n = build_builder(cfg, task, "train", augment=True, augment_device=place)
        order = None
    batch = cfg.data.batch_size
    per_step = info.world_size * cfg.train.grad_accum
    if cursor is not None and cursor.global_batch and cursor.global_batch != batch * per_step:
        if cfg.data.keep_global_batch and cursor.global_batch % per_step == 0:
            batch = cursor.global_batch // per_step
            log(f"world size changed: keeping the global batch of {cursor.global_batch} "
                f"with {batch} samples per rank")
        else:
            log(f"global batch changes from {cursor.global_batch} to {batch * per_step}; "
                f"continuing the same sample order from sample {cursor.offset} of epoch {cursor.epoch}")
    return TrainStream(builder, n=n, seed=cfg.seed, rank=info.rank, world=info.world_size, batch=batch,
                       accum=cfg.train.grad_accum, workers=cfg.data.workers, prefetch=cfg.data.prefetch, cursor=cursor,
                       worker_kind=cfg.data.worker_kind, device=info.device, order=order)


def total_steps(cfg: LenstrainConfig, stream: TrainStream) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * stream.steps_per_epoch))
