"""Training: ``build_*`` functions make the parts, and ``train_loop`` reads top to bottom."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.backends import Backend, build_backend
from lenstrain.checkpoint import Checkpointer
from lenstrain.config import LenstrainConfig, dump_config
from lenstrain.data import BatchBuilder, Cursor, TargetTransform, TrainStream, eval_batches
from lenstrain.distributed import DistInfo, init_distributed, shutdown_distributed
from lenstrain.losses import build_loss, default_loss, num_outputs_for, weight_penalty
from lenstrain.metrics import compute_metrics, predictions_from_output
from lenstrain.models import create_model
from lenstrain.optim import PlateauScheduler, build_optimizer, build_scheduler
from lenstrain.preemption import EXIT_NONFINITE, EXIT_REQUEUE, PreemptionFlag
from lenstrain.preflight import has_split
from lenstrain.tb import TBLogger
from shards.manifest import Manifest, load_manifest, write_json_atomic
from shards.reader import ShardReader


@dataclass
class TrainState:
    step: int = 0
    best_metric: float | None = None
    validations_without_improvement: int = 0
    early_stopping_best: float | None = None
    skipped_steps: int = 0
    stopped_early: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Task:
    """What the shard set asks of the model: the target, its loss and the output width."""

    manifest: Manifest
    target: TargetTransform
    loss_name: str
    num_classes: int
    num_outputs: int


class Printer:
    def __init__(self, info: DistInfo, enabled: bool = True):
        self.enabled = enabled and info.is_main

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[lenstrain] {message}", flush=True)


# ------------------------------------------------------------------------------------ builders


def build_task(cfg: LenstrainConfig) -> Task:
    manifest = load_manifest(cfg.data.shards)
    target = TargetTransform.from_manifest(manifest, cfg.data.target, cfg.data.target_scaling)
    num_classes = len(target.classes)
    loss_name = cfg.train.loss if cfg.train.loss != "auto" else default_loss(target.kind, num_classes)
    return Task(manifest, target, loss_name, num_classes, num_outputs_for(target.kind, loss_name, num_classes))


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


def build_builder(cfg: LenstrainConfig, task: Task, split: str, augment: bool) -> tuple[BatchBuilder, int]:
    reader = ShardReader(cfg.data.shards, split, manifest=task.manifest)
    stats = task.manifest.image.stats
    builder = BatchBuilder(reader, task.target, seed=cfg.seed, normalize=cfg.data.normalize and stats is not None,
                           mean=stats.mean if stats else 0.0, std=stats.std if stats else 1.0,
                           rotate=augment and cfg.data.augment.rotate, flip=augment and cfg.data.augment.flip)
    return builder, len(reader)


def build_train_stream(cfg: LenstrainConfig, task: Task, info: DistInfo, cursor: Cursor | None, log) -> TrainStream:
    builder, n = build_builder(cfg, task, "train", augment=True)
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
                       accum=cfg.train.grad_accum, workers=cfg.data.workers, prefetch=cfg.data.prefetch, cursor=cursor)


def total_steps(cfg: LenstrainConfig, stream: TrainStream) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * stream.steps_per_epoch))


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model: nn.Module, backend: Backend, cfg: LenstrainConfig, task: Task, loss_fn, split: str,
             rotations: int = 1) -> tuple[dict[str, float], dict]:
    """Metrics on a split, every sample once across ranks; also returns gathered predictions (rank 0)."""
    builder, n = build_builder(cfg, task, split, augment=False)
    batches = eval_batches(builder, n, rank=backend.info.rank, world=backend.info.world_size,
                           batch=cfg.data.val_batch_size or cfg.data.batch_size, workers=min(cfg.data.workers, 2))
    was_training = model.training
    model.eval()
    outputs, targets, indices = [], [], []
    for batch in batches:
        x = batch["image"].to(backend.info.device)
        with backend.autocast():
            out = sum(model(torch.rot90(x, k, dims=(-2, -1))).float() for k in range(rotations)) / rotations
        outputs.append(out.cpu())
        targets.append(batch["target"])
        indices.append(batch["index"])
    model.train(was_training)
    local = (torch.cat(outputs) if outputs else torch.empty(0, task.num_outputs),
             torch.cat(targets) if targets else torch.empty(0), torch.cat(indices) if indices else torch.empty(0))
    gathered = backend.gather_objects(local)
    metrics: dict[str, float] = {}
    result: dict = {}
    if backend.info.is_main:
        out = torch.cat([g[0] for g in gathered])
        tgt = torch.cat([g[1] for g in gathered])
        idx = torch.cat([g[2] for g in gathered])
        order = torch.argsort(idx)
        out, tgt, idx = out[order], tgt[order], idx[order]
        metrics["loss"] = float(loss_fn(out, tgt))
        pred = predictions_from_output(out, task.target.kind, task.loss_name)
        if task.target.kind == "regression":
            pred, true = task.target.decode(pred), task.target.decode(tgt)
        else:
            true = tgt
        metrics.update(compute_metrics(pred, true, task.target.kind, task.num_classes))
        result = {"pred": pred, "true": true, "index": idx}
    metrics = backend.broadcast_object(metrics)
    return {f"{split}/{k}": v for k, v in metrics.items()}, result


# ------------------------------------------------------------------------------------ the loop


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def write_progress(run_dir: Path, info: DistInfo, **fields) -> None:
    if info.is_main:
        write_json_atomic(run_dir / "progress.json", {**fields, "updated": time.time()})


def run_training(config: LenstrainConfig, run_dir: str | os.PathLike) -> int:
    """Train in ``run_dir`` (resuming from its newest complete checkpoint); returns the exit status:
    0 when done, :data:`EXIT_REQUEUE` after a collective save on a signal, :data:`EXIT_NONFINITE`."""
    info = init_distributed(config.parallel.backend)
    try:
        return train_loop(config, Path(run_dir), info)
    finally:
        shutdown_distributed()


def train_loop(cfg: LenstrainConfig, run_dir: Path, info: DistInfo) -> int:
    log = Printer(info, cfg.log.console)
    preempt = PreemptionFlag().install()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    task = build_task(cfg)
    model = build_model(cfg, task, info)
    optimizer = build_optimizer(cfg.optim, model)
    precision = resolve_precision(cfg.train.precision, info.device)
    backend = build_backend(cfg.parallel.strategy, model, optimizer, info, precision=precision,
                            grad_clip=cfg.train.grad_clip, find_unused_parameters=cfg.parallel.find_unused_parameters,
                            zero_stage=cfg.parallel.zero_stage, offload_optimizer=cfg.parallel.offload_optimizer)
    forward = torch.compile(backend.train_module) if cfg.model.compile else backend.train_module
    loss_fn = build_loss(task.loss_name, task.target.kind, task.num_classes, huber_delta=cfg.train.huber_delta,
                         label_smoothing=cfg.train.label_smoothing)
    checkpointer = Checkpointer(run_dir, backend, keep=cfg.checkpoint.keep, best_metric=cfg.checkpoint.best_metric,
                                best_mode=cfg.checkpoint.best_mode, log=log)

    resume_from = checkpointer.latest()
    meta = json.loads((resume_from / "meta.json").read_text()) if resume_from else None
    cursor = Cursor()
    if meta:
        cursor.load_state_dict(meta["cursor"])
    stream = build_train_stream(cfg, task, info, cursor if meta else None, log)
    steps = total_steps(cfg, stream)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps)
    state = TrainState()
    objects = {**backend.state_objects(), "scheduler": scheduler}
    if resume_from:
        checkpointer.load(resume_from, objects)
        state.load_state_dict(meta["train_state"])
        log(f"resumed from {resume_from} (step {state.step}, epoch {cursor.epoch}, "
            f"{cursor.samples_seen} samples seen)")
    else:
        log(f"starting a new run in {run_dir}")
    log(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters; {info.world_size} rank(s) "
        f"on {info.device.type}; {precision}; global batch {stream.global_batch}; {steps} steps "
        f"({stream.steps_per_epoch} per epoch)")

    has_val = has_split(task.manifest, cfg.data.val_split)
    if not has_val:
        log(f"warning: the shard set has no '{cfg.data.val_split}' split: no validation, and checkpoint.best_metric "
            f"cannot pick a best checkpoint (pack with --val > 0 to have one)")
    if cfg.schedule.warmup_steps > steps:
        log(f"warning: schedule.warmup_steps ({cfg.schedule.warmup_steps}) exceeds the {steps} training steps: "
            f"the whole run warms up")
    tb = TBLogger(run_dir / "tb", enabled=info.is_main)
    penalty = cfg.optim.l1 or cfg.optim.l2
    last_metrics: dict[str, float] = {}
    metrics_step = -1
    last_ckpt_time = time.monotonic()
    window_start, window_samples = time.perf_counter(), 0
    status = 0
    loss_value = last_logged_loss = None

    def save(reason: str) -> None:
        nonlocal last_ckpt_time
        if checkpointer.saved_step == state.step:
            return
        # Metrics belong to a checkpoint only when they were measured at its step.
        metrics = last_metrics if metrics_step == state.step else {}
        meta_out = {"step": state.step, "cursor": stream.cursor.state_dict(), "train_state": state.state_dict(),
                    "metrics": metrics, "last_metrics": last_metrics, "last_metrics_step": metrics_step,
                    "world_size": info.world_size, "reason": reason, "time": time.time()}
        path = checkpointer.save(state.step, objects, meta_out)
        last_ckpt_time = time.monotonic()
        log(f"checkpoint {path.name} complete ({reason})")

    def progress(run_state: str, loss: float | None = None, rate: float | None = None) -> None:
        write_progress(run_dir, info, state=run_state, step=state.step, total_steps=steps, loss=loss,
                       best_metric=state.best_metric, best_metric_name=cfg.checkpoint.best_metric,
                       samples_per_s=rate, epoch=stream.cursor.epoch)

    model.train()
    progress("running")
    while state.step < steps:
        micro_batches = stream.next_step()
        if state.step == 0 and cfg.log.images:
            tb.images("data/train_batch", micro_batches[0]["image"], 0)
        loss_total = torch.zeros((), device=info.device)
        for k, batch in enumerate(micro_batches):
            x = batch["image"].to(info.device, non_blocking=True)
            y = batch["target"].to(info.device, non_blocking=True)
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with backend.accumulating(last=k == len(micro_batches) - 1), backend.autocast():
                loss = loss_fn(forward(x), y)
                if penalty:
                    loss = loss + weight_penalty(model, cfg.optim.l1, cfg.optim.l2)
            backend.backward(loss / len(micro_batches))
            loss_total += loss.detach()
        loss_value = float(loss_total) / len(micro_batches)
        time_due = cfg.checkpoint.every_minutes is not None and info.is_main and (
            time.monotonic() - last_ckpt_time >= 60 * cfg.checkpoint.every_minutes)
        nonfinite, stop_signal, time_due = backend.any_flags([not math.isfinite(loss_value), preempt.set, time_due])

        if nonfinite:
            state.skipped_steps += 1
            if cfg.train.nan_policy == "stop" or state.skipped_steps > cfg.train.max_skipped_steps:
                log(f"non-finite loss ({loss_value}) at step {state.step + 1}; stopping. Checkpoints are untouched; "
                    f"lower optim.lr, use train.precision=fp32 or bf16, or set train.nan_policy=skip")
                progress("failed", loss_value)
                tb.close()
                return EXIT_NONFINITE
            log(f"non-finite loss at step {state.step + 1}: skipping its update "
                f"({state.skipped_steps} skipped so far, at most {cfg.train.max_skipped_steps})")
        grad_norm = backend.step(skip=nonfinite)
        scheduler.step()
        state.step += 1
        window_samples += stream.global_batch

        if state.step % cfg.log.every_steps == 0 or state.step == steps:
            mean_loss = backend.mean(loss_value)
            rate = window_samples / (time.perf_counter() - window_start)
            lr = scheduler.get_last_lr()[0]
            tb.scalars({"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                        "perf/samples_per_s": rate, "train/epoch": stream.cursor.epoch}, state.step)
            if info.device.type == "cuda":
                tb.scalars({"perf/gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}, state.step)
            log(f"step {state.step}/{steps} loss {mean_loss:.4g} lr {lr:.3g} grad {grad_norm:.3g} "
                f"{rate:.1f} samples/s")
            progress("running", mean_loss, rate)
            last_logged_loss = mean_loss
            window_start, window_samples = time.perf_counter(), 0

        validate_now = cfg.train.val_every_steps and state.step % cfg.train.val_every_steps == 0
        if has_val and (validate_now or state.step == steps):
            last_metrics = validate(model, backend, cfg, task, loss_fn, tb, state, scheduler, log)
            metrics_step = state.step
            if state.stopped_early:
                log(f"early stopping at step {state.step}: {cfg.train.early_stopping.metric} has not improved "
                    f"for {cfg.train.early_stopping.patience} validations")
                break

        every = cfg.checkpoint.every_steps
        if (every and state.step % every == 0) or time_due:
            save("periodic" if not time_due else "time")
        if stop_signal:
            save(f"signal {preempt.signum}")
            progress("preempted", last_logged_loss)
            log(f"stopping on signal {preempt.signum} at step {state.step}; exit {EXIT_REQUEUE} asks for a requeue")
            status = EXIT_REQUEUE
            break

    if status == 0:
        if loss_value is None:
            log(f"nothing to do: the run already reached step {state.step} of {steps}")
        save("final")
        progress("done", loss_value if loss_value is not None else last_logged_loss)
        tb.hparams({"model": cfg.model.name, "lr": cfg.optim.lr, "optim": cfg.optim.name,
                    "batch": stream.global_batch, "precision": precision}, last_metrics)
    tb.close()
    stream.close()
    preempt.restore()
    return status


def validate(model, backend, cfg, task, loss_fn, tb, state: TrainState, scheduler, log) -> dict[str, float]:
    metrics, result = evaluate(model, backend, cfg, task, loss_fn, cfg.data.val_split)
    tb.scalars(metrics, state.step)
    if result and task.target.kind == "regression" and cfg.log.images:
        from lenstrain.plots import pred_vs_true

        tb.figure("val/pred_vs_true", pred_vs_true(result["pred"].numpy(), result["true"].numpy(), task.target.name),
                  state.step)
    log("validation " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    best_name = cfg.checkpoint.best_metric
    if best_name in metrics and improved(metrics[best_name], state.best_metric, cfg.checkpoint.best_mode):
        state.best_metric = metrics[best_name]
    if isinstance(scheduler, PlateauScheduler):
        scheduler.observe(metrics)
    es = cfg.train.early_stopping
    if es is not None and es.metric in metrics:
        if improved(metrics[es.metric], state.early_stopping_best, es.mode, es.min_delta):
            state.early_stopping_best = metrics[es.metric]
            state.validations_without_improvement = 0
        else:
            state.validations_without_improvement += 1
            state.stopped_early = state.validations_without_improvement >= es.patience
    return metrics
