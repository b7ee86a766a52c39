"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks").

``python -m lenstrain lr-find CONFIG --out DIR`` trains the configured model on the train stream
for up to ``--steps`` steps while the learning rate grows exponentially from ``--min-lr`` to
``--max-lr``. The loss is smoothed with a bias-corrected exponential moving average, and the test
stops once the smoothed loss exceeds 4 times its best (divergence) or turns non-finite.

The suggested learning rate is where the smoothed loss falls fastest against log(lr); when it never
falls, it is the lr of the lowest loss divided by 10. Outputs in ``DIR``: ``lr_find.png`` (loss
against lr, log axis, suggestion marked), ``lr_find.json`` (``lrs``, ``losses`` (smoothed),
``raw_losses``, ``suggested_lr``, ``method``, ``stopped``) and TensorBoard events in ``DIR/tb``.
Nothing of the model is saved: the test spends the weights it trains.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from lenstrain.checkpointing.rundir import TB_DIR, write_json_atomic
from lenstrain.config.schema import LenstrainConfig, load_config
from lenstrain.optimization.losses import weight_penalty
from lenstrain.optimization.optimizers import build_optimizer
from lenstrain.parallel import Backend
from lenstrain.run.build import (
    build_loss,
    build_model,
    build_task,
    build_train_stream,
    local_info,
    single_process,
)
from lenstrain.run.tb import TBLogger
from shards.clikit import UsageError, fail
from shards.manifest import MANIFEST_NAME, not_a_shard_set

SMOOTHING = 0.98
DIVERGENCE = 4.0


def log(message: str) -> None:
    print(f"[lenstrain] {message}", flush=True)


def lr_at(i: int, steps: int, min_lr: float, max_lr: float) -> float:
    """Step ``i`` of an exponential ramp from ``min_lr`` (i = 0) to ``max_lr`` (i = steps - 1)."""
    return min_lr * (max_lr / min_lr) ** (i / max(1, steps - 1))


def suggest_lr(lrs, losses, min_lr: float, max_lr: float) -> tuple[float, str]:
    """The lr at the steepest descent of the smoothed loss against log(lr), else the min-loss lr / 10."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    n = len(lrs)
    half = max(1, n // 25)  # slopes over a few points, so one noisy batch does not decide
    at = np.arange(n // 10 + half, n - half)  # the first points carry the least averaging
    if len(at):
        x = np.log(lrs)
        slope = (losses[at + half] - losses[at - half]) / (x[at + half] - x[at - half])
        k = int(np.argmin(slope))
        if slope[k] < 0:
            return float(np.clip(lrs[at[k]], min_lr, max_lr)), "steepest descent of the smoothed loss"
    i = int(np.argmin(losses))
    return float(np.clip(lrs[i] / 10, min_lr, max_lr)), "lr of the lowest smoothed loss / 10"


def _accumulate(model, backend: Backend, micro_batches, loss_fn, l1: float, l2: float) -> float:
    """Forward and backward over one step's micro-batches; their mean loss."""
    device, total = backend.info.device, 0.0
    for batch in micro_batches:
        x, y = batch["image"].to(device), batch["target"].to(device)
        with backend.autocast():
            loss = loss_fn(backend.train_module(x), y)
            if l1 or l2:
                loss = loss + weight_penalty(model, l1, l2)
        backend.backward(loss / len(micro_batches))
        total += float(loss.detach()) / len(micro_batches)
    return total


def range_test(model, backend: Backend, stream, loss_fn, *, min_lr: float, max_lr: float, steps: int,
               l1: float = 0.0, l2: float = 0.0, tb: TBLogger | None = None, log=log) -> dict:
    """Run the ramp; returns ``lrs``, ``losses`` (smoothed), ``raw_losses`` and why it ``stopped``."""
    lrs, smoothed, raw = [], [], []
    average, best = 0.0, math.inf
    stopped = f"reached max_lr after {steps} steps"
    model.train()
    for i in range(steps):
        lr = lr_at(i, steps, min_lr, max_lr)
        for group in backend.optimizer.param_groups:
            group["lr"] = lr
        total = _accumulate(model, backend, stream.next_step(), loss_fn, l1, l2)
        if not math.isfinite(total):
            backend.optimizer.zero_grad(set_to_none=True)
            stopped = f"non-finite loss at lr {lr:.3g} (step {i + 1})"
            break
        backend.step()
        average = SMOOTHING * average + (1 - SMOOTHING) * total
        value = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        raw.append(total)
        smoothed.append(value)
        best = min(best, value)
        if tb is not None:
            tb.scalars({"lr_find/loss": total, "lr_find/smoothed_loss": value, "lr_find/lr": lr,
                        "lr_find/log10_lr": math.log10(lr)}, i)
        if (i + 1) % max(1, steps // 10) == 0:
            log(f"step {i + 1}/{steps} lr {lr:.3g} loss {total:.4g} smoothed {value:.4g}")
        if value > DIVERGENCE * best:
            stopped = f"diverged at lr {lr:.3g} (step {i + 1}): smoothed loss {value:.4g} > {DIVERGENCE:g} x best {best:.4g}"
            break
    return {"lrs": lrs, "losses": smoothed, "raw_losses": raw, "stopped": stopped}


def plot(result: dict, suggested: float):
    from lenstrain.evaluation.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result["lrs"], result["raw_losses"], color="0.75", lw=1, label="loss")
    ax.plot(result["lrs"], result["losses"], color="C0", lw=2, label="smoothed loss")
    ax.axvline(suggested, color="C3", ls="--", lw=1, label=f"suggested lr {suggested:.2g}")
    ax.set_xscale("log")
    smooth, low = result["losses"], min(min(result["losses"]), min(result["raw_losses"]))
    high = max(smooth[0], min(max(smooth), DIVERGENCE * min(smooth)))  # the divergence off the top
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) + 1e-12)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def check_args(args) -> LenstrainConfig:
    cfg = load_config(args.config, args.set)
    if not (args.min_lr > 0 and args.max_lr > args.min_lr):
        raise UsageError(f"need 0 < --min-lr < --max-lr, got {args.min_lr:g} and {args.max_lr:g}")
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: the ramp needs at least 2 steps")
    if not (Path(cfg.data.shards) / MANIFEST_NAME).is_file():
        raise UsageError(f"data.shards: {not_a_shard_set(cfg.data.shards)}")
    return cfg


def main(args) -> int:
    try:
        cfg = check_args(args)
        task = build_task(cfg)
        loss_fn = build_loss(cfg.train, task)
    except (UsageError, ValueError) as exc:  # a ConfigError is a UsageError
        return fail(str(exc))
    model = build_model(cfg, task, local_info())
    backend = single_process(cfg, model, build_optimizer(cfg.optim, model))
    stream = build_train_stream(cfg, task, backend.info, None, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"LR range test of {cfg.model.name} with {cfg.optim.name} ({task.loss_name} loss on {task.target.name!r}): "
        f"lr {args.min_lr:g} to {args.max_lr:g} over at most {args.steps} steps, global batch {stream.global_batch}")
    tb = TBLogger(out / TB_DIR, enabled=True)
    try:
        result = range_test(model, backend, stream, loss_fn, min_lr=args.min_lr, max_lr=args.max_lr,
                            steps=args.steps, l1=cfg.optim.l1, l2=cfg.optim.l2, tb=tb)
        if not result["lrs"]:
            print(f"error: no finite loss at all ({result['stopped']}); lower --min-lr", file=sys.stderr)
            return 1
        suggested, method = suggest_lr(result["lrs"], result["losses"], args.min_lr, args.max_lr)
        fig = plot(result, suggested)
        fig.savefig(out / "lr_find.png")
        tb.figure("lr_find/loss_vs_lr", fig, len(result["lrs"]))  # closes the figure
    finally:
        stream.close()
        tb.close()
    write_json_atomic(out / "lr_find.json", {**result, "suggested_lr": suggested, "method": method,
                                             "min_lr": args.min_lr, "max_lr": args.max_lr,
                                             "optimizer": cfg.optim.name, "model": cfg.model.name})
    log(result["stopped"])
    log(f"suggested lr {suggested:.3g} ({method}); try --set optim.lr={suggested:.2g}")
    log(f"wrote {out / 'lr_find.png'}, {out / 'lr_find.json'} and TensorBoard events in {out / TB_DIR}")
    return 0
