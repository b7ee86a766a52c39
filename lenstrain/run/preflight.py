"""Checks of a config against its shard set, run before any work starts.

The config's own validation cannot see the data; these checks can: the target exists, the loss
fits it, the model accepts its keyword arguments, the global batch fits the train split, and the
metric that picks the best checkpoint is one that validation produces.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from lenstrain.config.schema import LenstrainConfig
from lenstrain.evaluation.metrics import metric_names
from lenstrain.models import create_model
from lenstrain.models.registry import ModelOptionError
from lenstrain.optimization.losses import default_loss
from lenstrain.run.build import Task, build_loss, task_for
from shards.clikit import Problem
from shards.manifest import Manifest


@dataclass
class MetaModel:
    """The job's model built once on the meta device (nothing is allocated), for every check that needs it: its
    keyword arguments, ``model.init_from``'s shapes, and the size of a checkpoint."""

    name: str
    model: nn.Module | None = None
    problem: str | None = None  # why its keyword arguments cannot build it
    unbuildable: str | None = None  # why a layer of it cannot be built on the meta device ("Error: reason")


@dataclass
class Preflight:
    """The problems of a config on its shard set, and the model the checks built (None: they stopped before it)."""

    problems: list[Problem] = field(default_factory=list)
    meta: MetaModel | None = None


def preflight(cfg: LenstrainConfig, manifest: Manifest, world_size: int = 1) -> list[Problem]:
    """(dotted path, problem) for each way ``cfg`` cannot train on ``manifest``."""
    return run_preflight(cfg, manifest, world_size).problems


def run_preflight(cfg: LenstrainConfig, manifest: Manifest, world_size: int = 1) -> Preflight:
    """:func:`preflight`, with the model it built on the meta device (once) for the checks that come after."""
    name = cfg.data.target or manifest.primary_target
    if name not in manifest.targets:
        return Preflight([("data.target", f"{name!r} is not a target of the shard set; valid choices: "
                                          f"{', '.join(manifest.targets)}")])
    task = task_for(cfg, manifest)
    errors: list[Problem] = []
    try:
        build_loss(cfg.train, task)
    except ValueError as exc:
        errors.append(("train.loss", str(exc).replace("train.loss ", "")))
        task = replace(task, loss_name=default_loss(task.target.kind, task.num_classes))  # to check the rest
    shape = manifest.image.shape
    meta = build_meta_model(cfg.model.name, cfg.model.kwargs, shape[0], task.num_outputs, shape[1])
    errors += (_stream_problems(cfg, manifest) + _batch_problems(cfg, manifest, world_size) +
               _metric_problems(cfg, task) + _model_problems(cfg, meta))
    return Preflight(errors + _init_problems(cfg, meta), meta)


def _init_problems(cfg: LenstrainConfig, meta: MetaModel) -> list[Problem]:
    """``model.init_from`` names weights that exist and (where their shapes can be read cheaply) fit the model."""
    if not cfg.model.init_from:
        return []
    from lenstrain.checkpointing.finetune import init_problems

    def shapes() -> dict[str, tuple[int, ...]] | None:  # None: the model was not built (its own problem says why)
        if meta.model is None:
            return None
        return {k: tuple(v.shape) for k, v in meta.model.state_dict().items()}

    m = cfg.model
    return [("model.init_from", msg) for msg in init_problems(m.init_from, m.init_skip, m.init_strict, shapes)]


def _stream_problems(cfg: LenstrainConfig, manifest: Manifest) -> list[Problem]:
    """``data.stream``'s options as ``shards simulate`` checks them, then its samples against the shard set."""
    if cfg.data.stream is None:
        return []
    from lenstrain.data.stream import check_stream

    return check_stream(cfg, manifest)[1]


def _batch_problems(cfg: LenstrainConfig, manifest: Manifest, world_size: int) -> list[Problem]:
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    if cfg.data.stream is not None:
        n_train, where, what = cfg.data.stream.epoch_size, "data.stream.epoch_size", "samples of a stream epoch"
    else:
        train = manifest.splits.get("train")
        n_train, where, what = train.count if train else 0, "data.batch_size", "train samples"
    if global_batch <= n_train:
        return []
    return [(where, f"a global batch of {global_batch} samples ({cfg.data.batch_size} x {world_size} "
             f"rank(s) x {cfg.train.grad_accum} accumulation) exceeds the {n_train} {what}; "
             f"lower data.batch_size" + (" or raise data.stream.epoch_size" if cfg.data.stream else ""))]


def _metric_problems(cfg: LenstrainConfig, task: Task) -> list[Problem]:
    measured = [f"{cfg.data.val_split}/{m}" for m in metric_names(task.target.kind)]
    es = cfg.train.early_stopping
    errors = []
    for path, metric in (("checkpoint.best_metric", cfg.checkpoint.best_metric),
                         ("schedule.metric", cfg.schedule.metric if cfg.schedule.name == "plateau" else None),
                         ("train.early_stopping.metric", es.metric if es else None)):
        if metric and metric not in measured:
            errors.append((path, f"{metric!r} is not measured for a {task.target.kind} target; valid choices: "
                           f"{', '.join(measured)}"))
    return errors


def _model_problems(cfg: LenstrainConfig, meta: MetaModel) -> list[Problem]:
    _say_unbuildable(meta)
    return [("model.kwargs", meta.problem)] if meta.problem else []


def build_meta_model(name: str, kwargs: dict, in_channels: int = 1, num_outputs: int = 1,
                     image_size: int = 64) -> MetaModel:
    """``name`` built with ``kwargs`` on the meta device (so nothing is allocated), or why it cannot be."""
    try:
        with torch.device("meta"):
            model = create_model(name, in_channels=in_channels, num_outputs=num_outputs, image_size=image_size,
                                 **kwargs)
    except ModelOptionError as exc:  # it names the model and the keywords it takes
        return MetaModel(name, problem=str(exc))
    except (TypeError, ValueError) as exc:
        return MetaModel(name, problem=f"{name}: {exc}")
    except RuntimeError as exc:  # NotImplementedError included: some layers cannot be built on the meta device
        reason = (str(exc).strip().splitlines() or [""])[0]
        return MetaModel(name, unbuildable=f"{type(exc).__name__}: {reason}")
    return MetaModel(name, model=model)


def model_kwargs_problem(name: str, kwargs: dict, in_channels: int = 1, num_outputs: int = 1,
                         image_size: int = 64) -> str | None:
    """Why ``name`` cannot be built with ``kwargs`` (on the meta device, so nothing is allocated); None if it can."""
    meta = build_meta_model(name, kwargs, in_channels, num_outputs, image_size)
    _say_unbuildable(meta)
    return meta.problem


def _say_unbuildable(meta: MetaModel) -> None:
    if meta.unbuildable:
        print(f"note: model.kwargs not checked by building {meta.name} on the meta device ({meta.unbuildable}); "
              f"training will check them", file=sys.stderr)


def has_split(manifest: Manifest, split: str) -> bool:
    return split in manifest.splits and manifest.splits[split].count > 0
