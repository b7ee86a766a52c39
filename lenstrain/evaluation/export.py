"""``python -m lenstrain export RUN [--step N | --best] --out FILE``: a run's model as one plain file.

``FILE`` (``.safetensors`` or ``.pt``) holds the model's fp32 state dict from any run: single process,
DDP, or DeepSpeed ZeRO-1/2/3 (whose partitions are consolidated). It loads into ``create_model(...)``
with ``strict=True`` through ``safetensors.torch.load_file`` or ``torch.load(weights_only=True)``,
without DeepSpeed. The checkpoint is the newest complete one, ``--step N``'s, or with ``--best`` the
best by ``checkpoint.best_metric``.

Beside it, the same name with ``.json`` (``model.json`` for ``model.safetensors``) says how to use it:

- ``model``: the ``create_model`` arguments: ``name``, ``in_channels``, ``num_outputs``, ``image_size``,
  ``kwargs``;
- ``input``: the image ``shape`` (C, H, W) and its normalisation: ``normalize`` (``data.normalize``)
  with the training split's pixel ``mean`` and ``std``;
- ``target``: ``name``, ``kind``, ``loss``, ``classes`` and the scaling that decodes a regression
  output (``value = output * scale + shift``);
- ``tta_rotations`` (the run's default), and ``source``: the run, checkpoint, step and metrics.

:func:`load_exported` gives back the model and that information, and :func:`predict` turns raw images
into predictions in the target's units (class probabilities for classification), as
``lenstrain predict`` does, from the two files alone.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.checkpointing.checkpoint import (
    CheckpointReadError,
    best_checkpoints,
    complete_checkpoints,
    latest_complete,
    list_checkpoints,
    load_first,
    load_model_state,
    read_meta,
    step_dir_name,
    verify_checkpoint,
)
from lenstrain.checkpointing.rundir import RunDir, write_atomic, write_json_atomic
from lenstrain.data.loader import TargetTransform
from lenstrain.data.normalize import NORMALIZERS
from lenstrain.evaluation.metrics import predictions_from_output
from lenstrain.models import create_model
from shards.clikit import UsageError

FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt")


def log(message: str) -> None:
    print(f"[lenstrain] {message}", flush=True)


def info_path(weights: str | Path) -> Path:
    """The description beside a weights file: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


# ------------------------------------------------------------------------------------ export


def run_config(run_dir: Path):
    from lenstrain.config.schema import load_config

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    path = RunDir(run_dir).config
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {path.name}, so not a run directory "
                         f"(training writes it when it starts)")
    return load_config(path)


def run_task(cfg):
    """The run's task, from its training shard set, whose statistics normalise and decode."""
    from lenstrain.run.build import task_for
    from shards.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(cfg.data.shards)
    except ManifestError as exc:
        raise UsageError(f"{exc}: the run's training shard set holds the statistics that normalise its "
                         f"images and decode its predictions; restore it, or point the run's config.yaml "
                         f"data.shards at a copy") from None
    try:
        return task_for(cfg, manifest)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def choose_checkpoints(run_dir: Path, cfg, step: int | None, best: bool, log=log) -> tuple[list[Path], str]:
    """The checkpoints to try, in order, with a phrase that says how they were chosen: ``--step N``'s alone, the
    best ones by ``checkpoint.best_metric``, or the complete ones newest first (verified one at a time)."""
    root = RunDir(run_dir).checkpoints
    if step is not None:
        path = root / step_dir_name(step)
        if not path.is_dir():
            steps = [str(s) for s, p in list_checkpoints(root) if verify_checkpoint(p) is None]
            raise UsageError(f"--step {step}: no such checkpoint in {root}; complete checkpoints: "
                             f"{', '.join(steps) or 'none'}")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointReadError(f"--step {step}: {problem}")
        return [path], f"step {step}"
    if best:
        metric, mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
        ranked = best_checkpoints(root, metric, mode, verify=True, log=log)
        if not ranked:
            raise UsageError(f"--best: no complete checkpoint of {run_dir} records a finite "
                             f"{metric or 'checkpoint.best_metric (unset in the run)'}; export the newest "
                             f"(without --best) or one step (--step N)")
        return ranked, f"the best by {metric} ({mode})"
    problems: list[str] = []

    def note(message: str) -> None:
        problems.append(message)
        log(message)

    newest = latest_complete(root, log=note)
    if newest is None:
        if problems:
            raise CheckpointReadError(f"{root}: no usable checkpoint; the newest: {problems[0]}")
        raise UsageError(f"{run_dir}: no complete checkpoint under {root}; train the run first")
    older = complete_checkpoints(root, log=log, before=int(newest.name.removeprefix("step-")))
    return [newest, *older], "the newest complete checkpoint"


def model_info(cfg, task, run_dir: Path, step_dir: Path, why: str) -> dict:
    """What ``model.json`` holds: how to build the model, feed it and decode its outputs."""
    shape = [int(n) for n in task.manifest.image.shape]
    stats = task.manifest.image.stats
    meta = read_meta(step_dir)
    return {
        "format": FORMAT_VERSION,
        "model": {"name": cfg.model.name, "in_channels": shape[0], "num_outputs": task.num_outputs,
                  "image_size": shape[1], "kwargs": dict(cfg.model.kwargs)},
        "input": {"shape": shape, "normalize": cfg.data.normalize, "mean": stats.mean if stats else 0.0,
                  "std": (stats.std if stats else 1.0) or 1.0},  # as the batch builder reads them
        "target": {**asdict(task.target), "classes": list(task.target.classes), "loss": task.loss_name},
        "tta_rotations": cfg.train.tta_rotations,
        "source": {"run": str(run_dir.resolve()), "checkpoint": step_dir.name, "step": meta["step"],
                   "chosen": why, "metrics": meta.get("metrics", {}), "parallel": cfg.parallel.strategy,
                   "shards": str(cfg.data.shards)},
    }


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 floating tensors, contiguous, on the CPU, each with its own storage (as safetensors asks)."""
    def plain(value: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        return value.detach().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)

    return {key: plain(value) for key, value in state.items()}


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    write_atomic(path, data)


def check_outputs(paths: list[Path], force: bool, option: str = "--out") -> None:
    """Refuse to replace an existing file without ``force`` (naming it), and a directory even with it."""
    for path in paths:
        if path.is_dir():
            raise UsageError(f"{option} {path}: a directory; give a file name")
        if path.exists() and not force:
            raise UsageError(f"{option}: {path} exists; choose another name, or pass --force to replace it")


def export_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, best: bool = False,
               force: bool = False, log=log) -> dict:
    """Write ``out`` (the weights) and its ``.json`` description; returns the description.

    An existing ``out`` or description is refused unless ``force``; both are written atomically. A checkpoint
    that cannot be read is reported and the one before it used (except with ``step``).
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UsageError(f"--out {out}: the file name must end in {' or '.join(WEIGHT_SUFFIXES)}")
    check_outputs([out, info_path(out)], force)
    cfg = run_config(run_dir)
    task = run_task(cfg)
    candidates, why = choose_checkpoints(run_dir, cfg, step, best, log)

    def read(step_dir: Path) -> tuple[dict, dict]:
        state = plain_state(load_model_state(step_dir))
        info = model_info(cfg, task, run_dir, step_dir, why)
        try:
            build_model(info).load_state_dict(state)  # strict: what is written loads
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointReadError(f"{step_dir}: its weights do not fit {cfg.model.name} ({first})") from None
        return state, info

    step_dir, (state, info) = load_first(candidates, read, log=log, ckpt_root=RunDir(run_dir).checkpoints)
    if step_dir != candidates[0]:
        info["source"]["chosen"] = why = f"{why}, {candidates[0].name} being unreadable"
    out.parent.mkdir(parents=True, exist_ok=True)
    check_outputs([out, info_path(out)], force)  # nothing appeared meanwhile
    save_weights(state, out)
    write_json_atomic(info_path(out), info)
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    log(f"{run_dir}: {cfg.model.name} from {step_dir.name} ({why}), {params:,} fp32 values -> {out}, "
        f"{info_path(out)}")
    return info


# ------------------------------------------------------------------------------------ use


def build_model(info: dict) -> nn.Module:
    spec = info["model"]
    return create_model(spec["name"], in_channels=spec["in_channels"], num_outputs=spec["num_outputs"],
                        image_size=spec["image_size"], **spec["kwargs"])


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The exported model (strictly loaded, in eval mode, on ``device``) and its ``.json`` description."""
    info = json.loads(info_path(path).read_text())
    model = build_model(info)
    model.load_state_dict(load_weights(path))
    return model.to(device).eval(), info


@torch.no_grad()
def predict(model: nn.Module, info: dict, images, rotations: int | None = None) -> torch.Tensor:
    """Predictions for raw images ``(N, C, H, W)`` as the shard set stores them: values in the target's
    units (N,), or class probabilities (N, K); averaged over ``rotations`` 90-degree turns (default:
    the run's ``train.tta_rotations``)."""
    spec, target = info["input"], info["target"]
    x = torch.as_tensor(images, dtype=torch.float32).clone()
    x = NORMALIZERS[spec["normalize"]](x, spec["mean"], spec["std"])
    x = x.to(next(model.parameters()).device)
    turns = info["tta_rotations"] if rotations is None else rotations
    output = sum(model(torch.rot90(x, k, dims=(-2, -1))).float() for k in range(turns)) / turns
    pred = predictions_from_output(output.cpu(), target["kind"], target["loss"])
    fields = {k: v for k, v in target.items() if k != "loss"}
    return TargetTransform(**{**fields, "classes": tuple(fields["classes"])}).decode(pred)


# ------------------------------------------------------------------------------------ command line


def main(args) -> int:
    """``lenstrain export`` (its arguments are in :mod:`lenstrain.cli`)."""
    export_run(args.run, args.out, step=args.step, best=args.best, force=args.force)
    return 0
