"""The training loop, and only the loop: ``start_run`` builds the parts (see :mod:`lenstrain.run.build`) and
resumes from the newest complete checkpoint; ``train_loop`` steps through them, top to bottom.

No step reads the device on the host, except at a host step (a log, validation or checkpoint step, the last
one, or one where a save is due). A step's loss, grad norm and flags (non-finite loss, stop signal, timed
checkpoint due) stay on the device; its update is masked there when the loss is not finite. The host reads
the flags one step late: those of step k while step k+1's forward and backward are queued, before its update
(:func:`settle`), and at a host step those of that step itself, before it logs, validates or saves. So a
non-finite loss never reaches an update nor a checkpoint, and a stop signal saves at the next step boundary.

The run directory's config is written at the edge (``lenstrain train``, the launcher), not here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.checkpointing.checkpoint import (
    Checkpointer,
    CheckpointReadError,
    CheckpointWriteError,
    latest_complete,
    read_meta,
)
from lenstrain.checkpointing.rundir import RunDir, write_json_atomic
from lenstrain.checkpointing.space import estimate_checkpoint_bytes, free_space_warning
from lenstrain.config.schema import ConfigError, LenstrainConfig
from lenstrain.data.loader import Cursor, TrainStream
from lenstrain.evaluation.inference import evaluate
from lenstrain.evaluation.metrics import better
from lenstrain.optimization.losses import weight_penalty
from lenstrain.optimization.optimizers import PlateauScheduler, build_optimizer, build_scheduler
from lenstrain.parallel import Backend
from lenstrain.parallel.base import StepFlags
from lenstrain.parallel.distributed import DistInfo, init_distributed, shutdown_distributed
from lenstrain.run import hooks
from lenstrain.run.build import (
    Task,
    build_loss,
    build_model,
    build_parallel,
    build_task,
    build_train_stream,
    resolve_precision,
    total_steps,
)
from lenstrain.run.flops import FlopRate, flop_rate
from lenstrain.run.preemption import (
    EXIT_CHECKPOINT_FAILED,
    EXIT_NONFINITE,
    EXIT_REQUEUE,
    PreemptionFlag,
)
from lenstrain.run.preflight import has_split
from lenstrain.run.profiling import StepProfiler
from lenstrain.run.tb import TBLogger
from shards.exitcodes import EXIT_ERROR as EXIT_CHECKPOINT_UNREADABLE  # corruption found: nothing readable


@dataclass
class TrainState:
    """What a checkpoint keeps of the loop (``meta.json``'s ``train_state``)."""

    step: int = 0
    best_metric: float | None = None
    validations_without_improvement: int = 0
    early_stopping_best: float | None = None
    skipped_steps: int = 0
    stopped_early: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fields = set(asdict(self))
        unknown = sorted(set(state) - fields) if isinstance(state, dict) else ["(not an object)"]
        if unknown:
            raise ValueError(f"train_state: unknown key {unknown[0]!r}")
        for key, value in state.items():
            setattr(self, key, value)


NONFINITE, STOP_SIGNAL, TIME_DUE = range(3)  # a step's flags


@dataclass
class Pending:
    """A step taken whose flags the host has not read yet."""

    step: int  # its number (the state's step once it was taken)
    flags: StepFlags
    loss: torch.Tensor


@dataclass
class Carried:
    """What the loop carries from one step to the next and does not checkpoint."""

    loss: torch.Tensor | None = None  # this rank's loss at the last step taken (on the device)
    grad_norm: torch.Tensor | float | None = None  # of the last step taken
    pending: Pending | None = None
    stop_signal: bool = False  # read from the flags: save and stop at this step's boundary
    time_due: bool = False  # read from the flags: a timed checkpoint at this step's boundary
    logged_loss: float | None = None  # the mean loss last logged
    logged_tflops: float | None = None  # the TFLOP/s per device last logged
    logged_mfu: float | None = None  # and the model FLOPs utilisation (where the device's peak is known)
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    metrics_step: int = -1  # the step they were measured at
    saved_at: float = field(default_factory=time.monotonic)  # of the last checkpoint
    window_start: float = field(default_factory=time.perf_counter)  # of the throughput window
    window_samples: int = 0


class Printer:
    def __init__(self, info: DistInfo, enabled: bool = True):
        self.enabled = enabled and info.is_main

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[lenstrain] {message}", flush=True)


@dataclass
class Run:
    """The parts of one training run, built from its config, with the loop's state."""

    cfg: LenstrainConfig
    paths: RunDir
    info: DistInfo
    log: Printer
    task: Task
    model: nn.Module
    backend: Backend
    forward: Callable
    loss_fn: Callable
    scheduler: object
    stream: TrainStream
    checkpointer: Checkpointer
    tb: TBLogger
    preempt: PreemptionFlag
    steps: int
    has_val: bool
    flop_rate: FlopRate
    profiler: StepProfiler
    state: TrainState = field(default_factory=TrainState)
    carried: Carried = field(default_factory=Carried)

    @property
    def objects(self) -> dict[str, object]:
        """What a checkpoint saves with ``state_dict`` besides the backend's own."""
        return {**self.backend.state_objects(), "scheduler": self.scheduler}

    def close(self) -> None:
        self.profiler.close()
        self.tb.close()
        self.stream.close()


def run_training(config: LenstrainConfig, run_dir: str | os.PathLike) -> int:
    """Train in ``run_dir`` (resuming from its newest complete checkpoint); returns the exit status:
    0 when done, :data:`EXIT_REQUEUE` after a collective save on a signal, :data:`EXIT_NONFINITE`,
    :data:`EXIT_CHECKPOINT_FAILED` when a checkpoint could not be written, :data:`EXIT_CHECKPOINT_UNREADABLE` when
    no checkpoint of the run can be read (each with its one-line reason printed)."""
    info = init_distributed(config.parallel.backend, timeout_s=config.parallel.timeout_s,
                            trace_dir=RunDir(run_dir).logs)
    try:
        return train_loop(config, Path(run_dir), info)
    except CheckpointWriteError as exc:
        if info.is_main:
            print(f"[lenstrain] error: {exc}", flush=True)
        return EXIT_CHECKPOINT_FAILED
    except CheckpointReadError as exc:
        if info.is_main:
            print(f"[lenstrain] error: {exc}", flush=True)
        return EXIT_CHECKPOINT_UNREADABLE
    finally:
        shutdown_distributed()


def train_loop(cfg: LenstrainConfig, run_dir: Path, info: DistInfo) -> int:
    preempt = PreemptionFlag().install()
    run = None
    try:
        run = start_run(cfg, RunDir(run_dir), info, preempt)
        run.model.train()
        write_progress(run, "running")
        while run.state.step < run.steps and not run.state.stopped_early:
            status = take_step(run)
            if status is not None:
                return status
        finish(run)
        return 0
    finally:
        if run is not None:
            run.close()
        preempt.restore()


def take_step(run: Run) -> int | None:
    """One step and what its boundary asks for; an exit status when the run stops here."""
    cfg, state, carried = run.cfg, run.state, run.carried
    flags = train_step(run)
    if not settle(run):  # the last step's flags, read while this step is queued
        return stop_nonfinite(run)
    carried.grad_norm = run.backend.step(skip=flags.on_device[NONFINITE] > 0)
    run.scheduler.step()
    state.step += 1
    carried.window_samples += run.stream.global_batch
    carried.pending = Pending(state.step, flags, carried.loss)
    run.profiler.step(state.step)
    log_due = state.step % cfg.log.every_steps == 0 or state.step == run.steps
    val_due = run.has_val and (state.step == run.steps or (
        cfg.train.val_every_steps and state.step % cfg.train.val_every_steps == 0))
    every = cfg.checkpoint.every_steps
    save_due = bool(every and state.step % every == 0)
    if (log_due or val_due or save_due or carried.time_due or carried.stop_signal) and not settle(run):
        return stop_nonfinite(run)
    if log_due:
        log_step(run)
    if val_due:
        validate(run)
        if report_validation(run):
            return stop_pruned(run)
        if state.stopped_early:
            run.log(f"early stopping at step {state.step}: {cfg.train.early_stopping.metric} has not "
                    f"improved for {cfg.train.early_stopping.patience} validations")
            return None
    if save_due or carried.time_due:
        save(run, "periodic" if not carried.time_due else "time")
        carried.time_due = False
    if carried.stop_signal:
        save(run, f"signal {run.preempt.signum}")
        write_progress(run, "preempted", carried.logged_loss)
        run.log(f"stopping on signal {run.preempt.signum} at step {state.step}; exit {EXIT_REQUEUE} asks for a "
                f"requeue")
        return EXIT_REQUEUE
    return None


def settle(run: Run) -> bool:
    """Read the flags of the step not read yet, if any, and act on them: a non-finite loss (whose update was
    masked on the device) is skipped or stops the run as ``train.nan_policy`` says; a stop signal or a due
    timed checkpoint is noted for this step's boundary. False when the run must stop."""
    carried = run.carried
    pending, carried.pending = carried.pending, None
    if pending is None:
        return True
    nonfinite, stop_signal, time_due = pending.flags.read()
    run.backend.settle_skip(nonfinite)
    carried.stop_signal |= stop_signal
    carried.time_due |= time_due
    return not nonfinite or skip_nonfinite(run, pending)


def stop_nonfinite(run: Run) -> int:
    """The exit on a non-finite loss: nothing saved; progress at the last step whose update was applied."""
    write_progress(run, "failed", float(run.carried.loss))
    return EXIT_NONFINITE


# ------------------------------------------------------------------------------------ starting


def start_run(cfg: LenstrainConfig, paths: RunDir, info: DistInfo, preempt: PreemptionFlag) -> Run:
    """Build every part from ``cfg`` and restore the newest complete checkpoint in ``paths``, if any."""
    log = Printer(info, cfg.log.console)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
    task = build_task(cfg)
    model = build_model(cfg, task, info)
    if cfg.model.init_from and latest_complete(paths.checkpoints, log=lambda message: None) is None:
        init_weights(cfg, model, paths, info, log)  # a new run: its starting weights; a resume has its own
    rate = flop_rate(model, task.manifest.image.shape, info.device, resolve_precision(cfg.train.precision, info.device),
                     devices=info.world_size, peak_override=cfg.log.peak_tflops)  # before a backend wraps it
    optimizer = build_optimizer(cfg.optim, model)
    backend = build_parallel(cfg, model, optimizer, info)
    forward = backend.compiled_forward() if cfg.model.compile else backend.train_module
    checkpointer = Checkpointer(paths.root, backend, keep=cfg.checkpoint.keep, best_metric=cfg.checkpoint.best_metric,
                                best_mode=cfg.checkpoint.best_mode, log=log)
    tb = TBLogger(paths.tb, enabled=info.is_main)
    profiler = StepProfiler(cfg.train.profile, paths.profile, info, tb, log)

    def assemble(cursor: Cursor | None) -> Run:
        stream = build_train_stream(cfg, task, info, cursor, log)
        steps = total_steps(cfg, stream)
        return Run(cfg, paths, info, log, task, model, backend, forward, build_loss(cfg.train, task),
                   build_scheduler(cfg.schedule, optimizer, steps), stream, checkpointer, tb, preempt, steps,
                   has_split(task.manifest, cfg.data.val_split), rate, profiler)

    run = resume_or_start(checkpointer, assemble, paths, tb, log)
    announce(run)
    run.carried = Carried()  # its clocks start with the loop
    return run


def resume_or_start(checkpointer: Checkpointer, assemble, paths: RunDir, tb: TBLogger, log) -> Run:
    """The run from the newest complete checkpoint; one that cannot be read (on any rank) is reported and passed
    over for the one before it. When every one fails, the run stops naming the newest's file: it never starts
    over on top of its own checkpoints. With no checkpoint at all, a new run."""
    resume_from, first_problem = checkpointer.latest(), None
    while resume_from is not None:
        run, cursor, problem = try_resume(resume_from, checkpointer, assemble)
        if problem is None:
            log(f"resumed from {resume_from} (step {run.state.step}, epoch {cursor.epoch}, "
                f"{cursor.samples_seen} samples seen)")
            return run
        first_problem = first_problem or problem
        checkpointer.unreadable.add(int(resume_from.name.removeprefix("step-")))
        log(f"checkpoint {resume_from.name} cannot be read ({problem}); trying an older one")
        if run is not None:
            run.stream.close()
        resume_from = checkpointer.latest(before=int(resume_from.name.removeprefix("step-")))
    if first_problem is not None:
        tb.close()
        raise CheckpointReadError(f"{paths.checkpoints}: no usable checkpoint; the newest: {first_problem}")
    run = assemble(None)
    log(f"starting a new run in {paths.root}")
    return run


def try_resume(resume_from: Path, checkpointer: Checkpointer, assemble) -> tuple[Run | None, Cursor, str | None]:
    """The run restored from ``resume_from``, its data cursor, and the problem any rank had reading it (or None)."""
    run, problem, cursor = None, None, Cursor()
    try:
        meta = read_meta(resume_from)
        cursor.load_state_dict(meta["cursor"])
        run = assemble(cursor)
        checkpointer.load(resume_from, run.objects)
        run.state.load_state_dict(meta["train_state"])
    except (CheckpointReadError, KeyError, TypeError, ValueError) as exc:
        problem = str(exc) if isinstance(exc, CheckpointReadError) else (
            f"{resume_from / 'meta.json'}: {type(exc).__name__}: {exc}")
    return run, cursor, checkpointer.agree(problem)


def init_weights(cfg: LenstrainConfig, model: nn.Module, paths: RunDir, info: DistInfo, log) -> None:
    """Fine-tuning: every rank loads ``model.init_from`` into its fresh model; rank 0 reports what came over."""
    from lenstrain.checkpointing.finetune import INIT_REPORT, InitError, load_initial_weights

    m = cfg.model
    try:
        report = load_initial_weights(model, m.init_from, m.init_skip, m.init_strict)
    except InitError as exc:
        raise ConfigError(problems=[("model.init_from", str(exc))]) from None
    for line in report.lines():
        log(line)
    if info.is_main:
        write_json_atomic(paths.root / INIT_REPORT, {"init_from": m.init_from, "init_skip": m.init_skip,
                                                      "init_strict": m.init_strict, **report.to_json()})


def announce(run: Run) -> None:
    """The run's size and shape, and warnings about settings that cannot do what they say."""
    cfg, log = run.cfg, run.log
    log(f"{cfg.model.name}: {sum(p.numel() for p in run.model.parameters()):,} parameters; "
        f"{run.info.world_size} rank(s) on {run.info.device.type}; "
        f"{resolve_precision(cfg.train.precision, run.info.device)}; global batch {run.stream.global_batch}; "
        f"{run.steps} steps ({run.stream.steps_per_epoch} per epoch); {run.flop_rate.describe()}")
    if not run.has_val:
        log(f"warning: the shard set has no '{cfg.data.val_split}' split: no validation, and checkpoint.best_metric "
            f"cannot pick a best checkpoint (pack with --val > 0 to have one)")
    if cfg.train.max_steps is not None and cfg.train.epochs is not None:
        log(f"note: train.max_steps ({cfg.train.max_steps}) is set, so train.epochs ({cfg.train.epochs:g}) is not used")
    if cfg.schedule.warmup_steps > run.steps:
        log(f"warning: schedule.warmup_steps ({cfg.schedule.warmup_steps}) exceeds the {run.steps} training steps: "
            f"the whole run warms up")
    space = free_space_warning(run.paths.checkpoints, estimate_checkpoint_bytes(run.model, run.backend.optimizer))
    if space:
        log(space)


# ------------------------------------------------------------------------------------ one step


def train_step(run: Run) -> StepFlags:
    """Forward and backward over this rank's micro-batches of the next global batch; then, queued to be agreed
    across ranks on the device: whether the loss is non-finite, a stop signal came, a timed checkpoint is due."""
    cfg, info, backend = run.cfg, run.info, run.backend
    micro_batches = run.stream.next_step()
    if run.state.step == 0 and cfg.log.images:
        run.tb.images("data/train_batch", micro_batches[0]["image"], 0)
    loss_total = torch.zeros((), device=info.device)
    for k, batch in enumerate(micro_batches):
        x = batch["image"].to(info.device, non_blocking=True)
        y = batch["target"].to(info.device, non_blocking=True)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with backend.accumulating(last=k == len(micro_batches) - 1), backend.autocast():
            loss = run.loss_fn(run.forward(x), y)
            if cfg.optim.l1 or cfg.optim.l2:
                loss = loss + weight_penalty(run.model, cfg.optim.l1, cfg.optim.l2)
        backend.backward(loss / len(micro_batches))
        loss_total += loss.detach()
    run.carried.loss = loss_total / len(micro_batches)
    every = cfg.checkpoint.every_minutes
    time_due = every is not None and info.is_main and time.monotonic() - run.carried.saved_at >= 60 * every
    flags = torch.zeros(3, device=info.device)
    flags[NONFINITE] = ~torch.isfinite(run.carried.loss)
    if run.preempt.set:
        flags[STOP_SIGNAL] = 1.0
    if time_due:
        flags[TIME_DUE] = 1.0
    return backend.reduce_flags(flags)


def skip_nonfinite(run: Run, pending: Pending) -> bool:
    """Whether to go on past a non-finite loss (its update skipped), as ``train.nan_policy`` allows; when not,
    the state's step goes back to the last step whose update was applied."""
    state, train = run.state, run.cfg.train
    state.skipped_steps += 1
    if train.nan_policy == "stop" or state.skipped_steps > train.max_skipped_steps:
        state.step, run.carried.loss = pending.step - 1, pending.loss
        run.log(f"non-finite loss ({float(pending.loss)}) at step {pending.step}; stopping. Checkpoints are "
                f"untouched; lower optim.lr, use train.precision=fp32 or bf16, or set train.nan_policy=skip")
        return False
    run.log(f"non-finite loss at step {pending.step}: skipping its update "
            f"({state.skipped_steps} skipped so far, at most {train.max_skipped_steps})")
    return True


def log_step(run: Run) -> None:
    """The mean loss across ranks, the learning rate, the gradient norm, the throughput since the last log and
    its TFLOP/s per device (and MFU where the device's peak is known)."""
    step, carried = run.state.step, run.carried
    mean_loss = run.backend.mean(float(carried.loss))
    grad_norm = float(carried.grad_norm)
    rate = carried.window_samples / (time.perf_counter() - carried.window_start)
    perf = run.flop_rate.scalars(rate)
    lr = run.scheduler.get_last_lr()[0]
    run.tb.scalars({"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                    "perf/samples_per_s": rate, "train/epoch": run.stream.cursor.epoch, **perf}, step)
    if run.info.device.type == "cuda":
        run.tb.scalars({"perf/gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}, step)
    mfu = f" MFU {perf['perf/mfu']:.1%}" if "perf/mfu" in perf else ""
    run.log(f"step {step}/{run.steps} loss {mean_loss:.4g} lr {lr:.3g} grad {grad_norm:.3g} {rate:.1f} samples/s "
            f"{perf['perf/tflops']:.3g} TFLOP/s{mfu}")
    carried.logged_tflops = perf["perf/tflops"]
    carried.logged_mfu = perf.get("perf/mfu")
    write_progress(run, "running", mean_loss, rate)
    carried.logged_loss = mean_loss
    carried.window_start, carried.window_samples = time.perf_counter(), 0


# ------------------------------------------------------------------------------------ validation


def validate(run: Run) -> None:
    """Metrics on the validation split; they update the best metric, the plateau schedule and early stopping."""
    cfg, state = run.cfg, run.state
    metrics, result = evaluate(run.model, run.backend, cfg, run.task, run.loss_fn, cfg.data.val_split)
    run.carried.metrics, run.carried.metrics_step = metrics, state.step
    run.tb.scalars(metrics, state.step)
    if result and run.task.target.kind == "regression" and cfg.log.images:
        from lenstrain.evaluation.plots import pred_vs_true

        run.tb.figure("val/pred_vs_true", pred_vs_true(result["pred"].numpy(), result["true"].numpy(),
                                                       run.task.target.name), state.step)
    run.log("validation " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    best_name = cfg.checkpoint.best_metric
    if best_name in metrics and better(metrics[best_name], state.best_metric, cfg.checkpoint.best_mode):
        state.best_metric = metrics[best_name]
    if isinstance(run.scheduler, PlateauScheduler):
        run.scheduler.observe(metrics)
    es = cfg.train.early_stopping
    if es is not None and es.metric in metrics:
        if better(metrics[es.metric], state.early_stopping_best, es.mode, es.min_delta):
            state.early_stopping_best = metrics[es.metric]
            state.validations_without_improvement = 0
        else:
            state.validations_without_improvement += 1
            state.stopped_early = state.validations_without_improvement >= es.patience


def report_validation(run: Run) -> bool:
    """Hand this validation to the report hook (:mod:`lenstrain.run.hooks`, e.g. a sweep's pruner) on the main rank;
    whether every rank stops here."""
    prune = run.info.is_main and hooks.report(run.state.step, run.carried.metrics)
    if run.info.world_size > 1:
        prune = run.backend.mean(1.0 if prune else 0.0) > 0
    return bool(prune) and run.state.step < run.steps  # a run at its end completes


def stop_pruned(run: Run) -> int:
    """The report hook asked to stop: checkpoint, record the hyperparameters, exit :data:`hooks.EXIT_PRUNED`."""
    save(run, "pruned")
    write_progress(run, "pruned", run.carried.logged_loss)
    write_hparams(run)
    run.log(f"pruned at step {run.state.step}; exit {hooks.EXIT_PRUNED}")
    return hooks.EXIT_PRUNED


# ------------------------------------------------------------------------------------ saving and reporting


def save(run: Run, reason: str) -> None:
    """A collective checkpoint of this step (once per step), with the metrics measured at it."""
    state, carried = run.state, run.carried
    if run.checkpointer.saved_step == state.step:
        return
    metrics = carried.metrics if carried.metrics_step == state.step else {}
    meta = {"step": state.step, "cursor": run.stream.cursor.state_dict(), "train_state": state.state_dict(),
            "metrics": metrics, "last_metrics": carried.metrics, "last_metrics_step": carried.metrics_step,
            "world_size": run.info.world_size, "reason": reason, "time": time.time()}
    path = run.checkpointer.save(state.step, run.objects, meta)
    carried.saved_at = time.monotonic()
    run.log(f"checkpoint {path.name} complete ({reason})")


def finish(run: Run) -> None:
    """The final checkpoint, progress and hyperparameters of a run that reached its end (or stopped early)."""
    carried = run.carried
    if carried.loss is None:
        run.log(f"nothing to do: the run already reached step {run.state.step} of {run.steps}")
    save(run, "final")
    write_progress(run, "done", float(carried.loss) if carried.loss is not None else carried.logged_loss)
    write_hparams(run)


def write_hparams(run: Run) -> None:
    """TensorBoard hparams with the last validation's metrics (and those the report hook's installer adds)."""
    cfg = run.cfg
    # One name per parameter, the config's dotted key (a sweep's trial parameters use the same names).
    hparams = {"model.name": cfg.model.name, "optim.lr": cfg.optim.lr, "optim.name": cfg.optim.name,
               "schedule.name": cfg.schedule.name, "global_batch": run.stream.global_batch,
               "train.precision": resolve_precision(cfg.train.precision, run.info.device), "seed": cfg.seed,
               **hooks.extra_hparams()}
    run.tb.hparams(hparams, run.carried.metrics, run.state.step)


def write_progress(run: Run, state: str, loss: float | None = None, rate: float | None = None) -> None:
    """``progress.json``; ``tflops`` and ``mfu`` are the last logged TFLOP/s per device and model FLOPs
    utilisation, also once the run has stopped."""
    if run.info.is_main:
        write_json_atomic(run.paths.progress, {
            "state": state, "step": run.state.step, "total_steps": run.steps, "loss": loss,
            "best_metric": run.state.best_metric, "best_metric_name": run.cfg.checkpoint.best_metric,
            "samples_per_s": rate, "tflops": run.carried.logged_tflops, "mfu": run.carried.logged_mfu,
            "epoch": run.stream.cursor.epoch, "updated": time.time()})
