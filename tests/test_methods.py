"""Training methods: losses, optimizers (Lion by hand), schedules, penalties, early stopping,
test-time rotation averaging, the LR range test, and the eval/predict commands, on a real shard set."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lion_pytorch import Lion

from lenstrain.checkpointing.checkpoint import list_checkpoints, read_meta
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.cli import main as cli
from lenstrain.config.schema import dump_config, load_config
from lenstrain.evaluation.evaluate import choose_checkpoint, split_keys
from lenstrain.evaluation.inference import evaluate
from lenstrain.optimization.losses import LOSSES, make_loss, weight_penalty
from lenstrain.optimization.lr_find import suggest_lr
from lenstrain.optimization.optimizers import (
    OPTIMIZERS,
    SCHEDULES,
    PlateauScheduler,
    build_optimizer,
    build_scheduler,
)
from lenstrain.parallel import Backend
from lenstrain.parallel.distributed import DistInfo
from lenstrain.run.build import build_builder, build_loss, build_model, build_task
from lenstrain.run.train import run_training
from shards.manifest import load_manifest
from shards.pack import TargetSpec, pack_shard_set
from tests.factories import config_dict, merged, write_config
from tests.train_helpers import lenstrain

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LR = 1e-3
# four steps, checkpoints and validations at steps 2 and 4; not deterministic: runs in this process
SHORT = {"train": {"max_steps": 4, "deterministic": False}, "checkpoint": {"every_steps": 2, "keep": 3}}


def config(shards: Path, **sections):
    """A validated config: the tiny model on the 32x32 ring set, fp32 on CPU, four steps."""
    return load_config(merged(config_dict(shards, **SHORT), **sections))


@dataclass
class Trained:
    optimizer: torch.optim.Optimizer
    losses: list[float]  # one per step
    lrs: list[float]  # the learning rate each step applied
    moved: float  # how far the weights moved, summed over every parameter


def train(cfg, steps: int = 1) -> Trained:
    """Build the task, model, loss, optimizer and schedule from ``cfg`` and take ``steps`` optimizer steps on
    real batches. A plateau schedule is told, after each step, of a validation loss that never improves."""
    task = build_task(cfg)
    model = build_model(cfg, task, CPU)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.schedule, optimizer, total_steps=cfg.train.max_steps)
    loss_fn = build_loss(cfg.train, task)
    builder, _ = build_builder(cfg, task, "train", augment=False)
    before = [p.detach().clone() for p in model.parameters()]
    losses, lrs = [], []
    for step in range(steps):
        batch = builder(np.arange(4 * step, 4 * step + 4), None)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        loss = loss_fn(model(batch["image"]), batch["target"])
        loss.backward()
        optimizer.step()
        scheduler.step()
        if isinstance(scheduler, PlateauScheduler):
            scheduler.observe({"val/loss": 1.0})
        losses.append(float(loss.detach()))
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before, strict=True))
    return Trained(optimizer, losses, lrs, moved)


# ------------------------------------------------------------------------------------ losses


LOSS_CASES = {  # name -> (the target it trains, its options)
    "mse": ("y", {}), "mae": ("y", {}), "huber": ("y", {"huber_delta": 0.5}),
    "bce": ("cls", {"label_smoothing": 0.1}), "ce": ("cls", {"label_smoothing": 0.1}),
}


@pytest.mark.parametrize("loss", LOSSES)  # every name in the table; a new one needs its row above
def test_each_loss_builds_from_config_and_trains(ring_shards, loss):
    target, extra = LOSS_CASES[loss]
    cfg = config(ring_shards, data={"target": target}, train={"loss": loss, **extra})
    trained = train(cfg)
    assert math.isfinite(trained.losses[0]) and trained.losses[0] > 0
    assert trained.moved > 0


def test_loss_values_and_label_smoothing():
    out, y = torch.tensor([[0.5], [2.0], [-1.0]]), torch.tensor([0.0, 0.5, 1.0])
    huber = make_loss("huber", "regression", 0, huber_delta=0.5, label_smoothing=0)
    err = (out.squeeze(-1) - y).abs()
    expected = torch.where(err < 0.5, 0.5 * err**2, 0.5 * (err - 0.25)).mean()
    assert torch.allclose(huber(out, y), expected)
    assert torch.allclose(make_loss("mae", "regression", 0, huber_delta=1, label_smoothing=0)(out, y), err.mean())

    logits, labels = torch.tensor([[3.0], [-2.0]]), torch.tensor([1, 0])
    bce = make_loss("bce", "classification", 2, huber_delta=1, label_smoothing=0.2)
    soft = torch.tensor([0.9, 0.1])  # 1 -> 1 - 0.2 + 0.1, 0 -> 0.1
    assert torch.allclose(bce(logits, labels), F.binary_cross_entropy_with_logits(logits.squeeze(-1), soft))

    logits3, labels3 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    ce = make_loss("ce", "classification", 3, huber_delta=1, label_smoothing=0.3)
    logp = torch.log_softmax(logits3, -1)
    q = torch.full((2, 3), 0.1)
    q[0, 0] = q[1, 2] = 0.8  # (1 - 0.3) on the true class + 0.3 / 3 everywhere
    assert torch.allclose(ce(logits3, labels3), -(q * logp).sum(-1).mean())
    with pytest.raises(ValueError, match="needs 2 classes"):
        make_loss("bce", "classification", 3, huber_delta=1, label_smoothing=0)


def test_weight_penalties_add_the_right_amount():
    cfg = load_config({"data": {"shards": "x"}, "train": {"max_steps": 1}, "optim": {"l1": 0.01, "l2": 0.003}})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    weights = [model[0].weight, model[2].weight]  # not biases, not the norm's scale
    expected = sum(0.01 * w.abs().sum() + 0.003 * w.pow(2).sum() for w in weights)
    x, y = torch.randn(8, 3), torch.randn(8)
    base = F.mse_loss(model(x).squeeze(-1), y)
    total = base + weight_penalty(model, cfg.optim.l1, cfg.optim.l2)
    assert torch.allclose(total - base, expected)
    total.backward()
    w = model[0].weight
    base_grad = torch.autograd.grad(F.mse_loss(model(x).squeeze(-1), y), w)[0]
    assert torch.allclose(w.grad - base_grad, 0.01 * w.sign() + 2 * 0.003 * w.detach(), atol=1e-6)
    assert weight_penalty(model, 0.0, 0.0) is None


# ------------------------------------------------------------------------------------ optimizers


OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam,
                     "sgd": torch.optim.SGD, "lion": Lion}


@pytest.mark.parametrize("name", OPTIMIZERS)  # every name in the table; a new one needs its class above
def test_each_optimizer_builds_from_config_and_trains(ring_shards, name):
    cfg = config(ring_shards, optim={"name": name, "lr": LR, "weight_decay": 0.01}, schedule={"name": "constant"})
    trained = train(cfg, steps=2)
    assert type(trained.optimizer) is OPTIMIZER_CLASSES[name]  # its own class, not a subclass or a stand-in
    decay, no_decay = trained.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == LR
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0  # weights decay, biases and norms not
    assert all(math.isfinite(v) for v in trained.losses)
    assert trained.moved > 0


def test_lion_follows_the_paper_update_rule():
    lr, wd, b1, b2 = 0.01, 0.1, 0.9, 0.99
    cfg = load_config({"data": {"shards": "x"}, "train": {"max_steps": 1},
                       "optim": {"name": "lion", "lr": lr, "weight_decay": wd, "betas": [b1, b2]}})
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    optimizer = build_optimizer(cfg.optim, model)
    start = model.weight.detach().clone()

    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in theta.items()}
    decay = {"weight": wd, "bias": 0.0}  # decoupled weight decay on weight matrices only
    for _ in range(5):
        # the gradient at the hand-updated parameters
        ref = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        grads = torch.autograd.grad(F.mse_loss(x @ ref["weight"].T + ref["bias"], y), [ref["weight"], ref["bias"]])
        for (n, t), g in zip(theta.items(), grads, strict=True):
            c = b1 * m[n] + (1 - b1) * g
            theta[n] = t - lr * (torch.sign(c) + decay[n] * t)
            m[n] = b2 * m[n] + (1 - b2) * g
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), theta[n], atol=1e-6), n
        assert torch.allclose(optimizer.state[p]["exp_avg"], m[n], atol=1e-6), n
    assert (model.weight - start).abs().max() > 0.04  # 5 sign steps of 0.01 really moved it


# ------------------------------------------------------------------------------------ schedules


def cosine_lrs(steps: int, warmup: int, min_ratio: float) -> list[float]:
    decay = [min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * s / (steps - warmup)))
             for s in range(steps - warmup)]
    return [LR * f for f in [(s + 1) / warmup for s in range(warmup)] + decay]


SCHEDULE_CURVES = {  # name -> (its options, the learning rates 8 training steps apply, or None: checked by shape)
    "constant": ({}, [LR] * 8),
    "cosine": ({"warmup_steps": 2, "min_lr_ratio": 0.1}, cosine_lrs(8, 2, 0.1)),
    "onecycle": ({"pct_start": 0.3}, None),
    "step": ({"step_size": 3, "gamma": 0.5}, [LR] * 3 + [LR / 2] * 3 + [LR / 4] * 2),
    # validations at 1.0 after every step: the first sets the best, the second is tolerated (patience 1),
    # the third halves the lr, and then every second one
    "plateau": ({"patience": 1, "factor": 0.5}, [LR] * 3 + [LR / 2] * 2 + [LR / 4] * 2 + [LR / 8]),
}


@pytest.mark.parametrize("name", SCHEDULES)  # every name in the table; a new one needs its curve above
def test_each_schedule_builds_from_config_and_trains(ring_shards, name):
    options, expected = SCHEDULE_CURVES[name]
    cfg = config(ring_shards, optim={"lr": LR}, schedule={"name": name, **options}, train={"max_steps": 8})
    trained = train(cfg, steps=8)
    if expected is not None:
        assert trained.lrs == pytest.approx(expected, rel=1e-6), trained.lrs
    else:  # one cycle: from lr / 25 up to lr within the first 30%, then down towards zero
        lrs = trained.lrs
        peak = int(np.argmax(lrs))
        assert lrs[0] == pytest.approx(LR / 25) and 1 <= peak <= 3 and lrs[peak] > 0.9 * LR
        assert np.all(np.diff(lrs[: peak + 1]) > 0) and np.all(np.diff(lrs[peak:]) < 0) and lrs[-1] < LR / 10
    assert all(math.isfinite(v) for v in trained.losses)
    assert trained.moved > 0


def lr_curve(schedule: dict, steps: int, total: int, lr: float = 0.1) -> list[float]:
    cfg = load_config({"data": {"shards": "x"}, "train": {"max_steps": total}, "optim": {"name": "sgd", "lr": lr},
                       "schedule": schedule})
    optimizer = build_optimizer(cfg.optim, nn.Linear(2, 1))
    scheduler = build_scheduler(cfg.schedule, optimizer, total)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_schedule_curves():
    assert lr_curve({"name": "constant"}, 20, 20) == pytest.approx([0.1] * 21)

    cos = lr_curve({"name": "cosine", "warmup_steps": 5, "min_lr_ratio": 0.1}, 50, 50)
    assert cos[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # warmup rises to the peak
    assert cos[5] == pytest.approx(0.1)
    assert np.all(np.diff(cos[5:]) <= 1e-12)  # then decays
    assert cos[50] == pytest.approx(0.1 * 0.1)  # ends at min_lr_ratio
    assert cos[5 + 45 // 2] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 22 / 45)))

    one = lr_curve({"name": "onecycle", "pct_start": 0.3}, 40, 40)
    peak = int(np.argmax(one))
    assert one[peak] == pytest.approx(0.1, rel=1e-2) and 10 <= peak <= 14
    assert one[0] < 0.1 / 10 and one[-1] < one[0]  # starts low, ends lower

    step = lr_curve({"name": "step", "step_size": 10, "gamma": 0.5}, 35, 35)
    assert step[0] == step[9] == pytest.approx(0.1)
    assert step[10] == step[19] == pytest.approx(0.05)
    assert step[30] == pytest.approx(0.0125)


def test_plateau_reduces_after_patience_bad_validations():
    cfg = load_config({"data": {"shards": "x"}, "train": {"max_steps": 100}, "optim": {"name": "sgd", "lr": 0.1},
                       "schedule": {"name": "plateau", "patience": 2, "factor": 0.5}})
    optimizer = build_optimizer(cfg.optim, nn.Linear(2, 1))
    scheduler = build_scheduler(cfg.schedule, optimizer, 100)
    assert isinstance(scheduler, PlateauScheduler)
    seen = []
    for value in [1.0, 0.9, 0.9, 0.9, 0.95, 0.9, 0.9, 0.8]:
        scheduler.step()
        scheduler.observe({"val/loss": value, "val/r2": 0.0})
        seen.append(scheduler.get_last_lr()[0])
    # 0.9 is the best; `patience` (2) bad validations are tolerated, the next one halves the lr
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    scheduler.observe({"val/r2": 0.5})  # another metric: ignored
    assert scheduler.get_last_lr()[0] == pytest.approx(0.05)


def test_plateau_warmup_rises_then_holds():
    lrs = lr_curve({"name": "plateau", "warmup_steps": 4}, 8, 100)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and lrs[4:] == pytest.approx([0.1] * 5)


# ------------------------------------------------------------------------------------ early stopping


def test_early_stopping_stops_a_real_run(tmp_path, ring_shards):
    cfg = write_config(tmp_path / "c.yaml", ring_shards,
                       train={"max_steps": 40, "val_every_steps": 2, "deterministic": False,
                              "early_stopping": {"metric": "val/loss", "patience": 1, "min_delta": 1e9}},
                       checkpoint={"every_steps": 0})
    run = tmp_path / "run"
    proc = lenstrain("train", cfg, "--run-dir", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the first validation (step 2) sets the best; the second (step 4) cannot beat it by 1e9
    assert "early stopping at step 4" in proc.stdout, proc.stdout
    assert "step 5/40" not in proc.stdout
    progress = json.loads((run / "progress.json").read_text())
    assert progress["state"] == "done" and progress["step"] == 4
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]
    assert read_meta(run / "checkpoints" / "step-00000004")["train_state"]["stopped_early"] is True


# ------------------------------------------------------------------------------------ rotation averaging


class Pointwise(nn.Module):
    """1x1 convolutions and a global average: exactly invariant to 90-degree rotations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Tanh(), nn.Conv2d(8, 8, 1), nn.Tanh(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


class Positional(nn.Module):
    """A dense layer over pixel positions: not rotation invariant."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * size * size, 1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("model_cls, invariant", [(Pointwise, True), (Positional, False)])
def test_rotation_averaging(ring_shards, model_cls, invariant):
    cfg = config(ring_shards)
    task = build_task(cfg)
    torch.manual_seed(0)
    model = model_cls()
    backend = Backend(model, None, CPU, precision="fp32", grad_clip=None)
    loss_fn = build_loss(cfg.train, task)  # the config's defaults: huber_delta 1, no label smoothing
    m1, r1 = evaluate(model, backend, cfg, task, loss_fn, "test", rotations=1)
    m4, r4 = evaluate(model, backend, cfg, task, loss_fn, "test", rotations=4)
    assert len(r1["pred"]) == 18 and torch.equal(r1["index"], r4["index"])
    gap = float((r1["pred"] - r4["pred"]).abs().max())
    if invariant:
        assert gap < 1e-5
        assert m1["test/mse"] == pytest.approx(m4["test/mse"], rel=1e-4, abs=1e-8)
    else:
        assert gap > 1e-3
        _, r2 = evaluate(model, backend, cfg, task, loss_fn, "test", rotations=2)  # the mean of two turns
        builder, _ = build_builder(cfg, task, "test", augment=False)
        x = builder(np.arange(18), None)["image"]
        with torch.no_grad():
            manual = (model(x) + model(torch.rot90(x, 1, dims=(-2, -1)))) / 2
        assert torch.allclose(r2["pred"], task.target.decode(manual.squeeze(-1)), atol=1e-5)


# ------------------------------------------------------------------------------------ lr-find


def test_suggest_lr():
    lrs = np.logspace(-6, 0, 61)
    falling = 2 - np.tanh(np.log10(lrs) + 3)  # steepest at 1e-3
    lr, method = suggest_lr(lrs, falling, 1e-6, 1.0)
    assert lr == pytest.approx(1e-3, rel=0.3) and "steepest" in method
    rising = np.linspace(1, 3, 61)  # never falls: the lowest loss's lr / 10, kept inside the range
    assert suggest_lr(lrs, rising, 1e-6, 1.0) == (1e-6, "lr of the lowest smoothed loss / 10")
    bowl = (np.log10(lrs) + 2) ** 2
    lr, _ = suggest_lr(lrs, bowl, 1e-6, 1.0)
    assert 1e-6 <= lr < 1e-2


def test_lr_find_writes_plot_json_and_tensorboard(tmp_path, ring_shards, capsys):
    cfg = write_config(tmp_path / "c.yaml", ring_shards, train={"deterministic": False})
    out = tmp_path / "lrf"
    assert cli(["lr-find", str(cfg), "--out", str(out), "--steps", "16", "--min-lr", "1e-5", "--max-lr", "10",
                "--set", "data.batch_size=2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "lr_find.json").read_text())
    assert 2 <= len(result["lrs"]) <= 16 and len(result["losses"]) == len(result["lrs"])
    assert result["lrs"][0] == pytest.approx(1e-5) and np.all(np.diff(result["lrs"]) > 0)
    assert 1e-5 <= result["suggested_lr"] <= 10
    assert all(math.isfinite(v) for v in result["losses"])
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert f"suggested lr {result['suggested_lr']:.3g}" in printed
    assert not list(out.rglob("*.pt"))  # nothing of the model is kept

    assert cli(["lr-find", str(cfg), "--out", str(out), "--min-lr", "1", "--max-lr", "0.1"]) == 2
    assert cli(["lr-find", str(cfg), "--out", str(out), "--set", "optim.name=adamx"]) == 2
    assert "optim.name" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ eval and predict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ring_shards):
    """A short real run (in this process): validations and checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("runs") / "reg"
    return trained_run(run, config(ring_shards, train={"val_every_steps": 2}))


def trained_run(run: Path, cfg) -> Path:
    """Train ``cfg`` in ``run`` in this process, its config.yaml written first (as `lenstrain train` does)."""
    run.mkdir(parents=True, exist_ok=True)
    RunDir(run).config.write_text(dump_config(cfg))
    assert run_training(cfg, run) == 0
    return run


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_eval_writes_metrics_plot_and_csv(run_dir, ring_shards, capsys):
    assert cli(["eval", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    out = run_dir / "eval" / "test"
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"loss", "mse", "mae", "r2"}
    assert metrics["mse"] >= 0 and metrics["mae"] >= 0 and metrics["r2"] is not None and metrics["r2"] <= 1
    assert metrics["mae"] <= math.sqrt(metrics["mse"]) + 1e-9
    assert report["samples"] == 18 and report["split"] == "test" and report["tta_rotations"] == 1
    # the checkpoint with the best recorded val/loss
    scored = {p: read_meta(p)["metrics"]["val/loss"] for _, p in list_checkpoints(run_dir / "checkpoints")}
    assert len(scored) == 2 and Path(report["checkpoint"]) == min(scored, key=scored.get)
    assert "the best by val/loss" in report["checkpoint_choice"]
    assert "test/r2" in printed and "metrics.json" in printed
    assert (out / "pred_vs_true.png").stat().st_size > 5_000

    header, rows = read_csv(out / "predictions.csv")
    assert header == ["key", "index", "y", "true_y"]
    manifest = load_manifest(ring_shards)
    assert [r["key"] for r in rows] == split_keys(manifest, "test") and [int(r["index"]) for r in rows] == list(range(18))
    pred, true = np.array([float(r["y"]) for r in rows]), np.array([float(r["true_y"]) for r in rows])
    assert np.all((true >= 0) & (true <= 1))  # ring radii: in the target's own units
    assert np.mean((pred - true) ** 2) == pytest.approx(metrics["mse"], rel=1e-5)

    assert cli(["eval", str(run_dir), "--checkpoint", "latest", "--tta", "4", "--split", "val"]) == 0
    report = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    assert report["tta_rotations"] == 4 and report["step"] == 4 and report["samples"] == 18


def test_predict_writes_one_row_per_sample(run_dir, ring_shards, tmp_path):
    out = tmp_path / "preds.csv"
    assert cli(["predict", str(run_dir), "--shards", str(ring_shards), "--split", "val", "--out", str(out)]) == 0
    header, rows = read_csv(out)
    assert header == ["key", "index", "y", "true_y"]
    assert [r["key"] for r in rows] == split_keys(load_manifest(ring_shards), "val")
    assert all(math.isfinite(float(r["y"])) for r in rows)


class Unlabelled:
    """Ring images whose labels lack the run's target: predict must still work, without true_y."""

    def __call__(self, i: int):
        rng = np.random.default_rng(100 + i)
        return rng.normal(size=(1, 32, 32)).astype(np.float32), {"z": float(i)}


def test_predict_on_a_shard_set_without_the_target(run_dir, tmp_path):
    other = tmp_path / "other"
    pack_shard_set(other, sample_fn=Unlabelled(), split_of=["test"] * 5 + ["train"] * 3,
                   targets=[TargetSpec("z", "regression")], primary_target="z", source={"kind": "noise"})
    out = tmp_path / "p.csv"
    assert cli(["predict", str(run_dir), "--shards", str(other), "--out", str(out)]) == 0
    header, rows = read_csv(out)
    assert header == ["key", "index", "y"] and len(rows) == 5
    assert cli(["eval", str(run_dir), "--shards", str(other)]) == 2  # no labels to score against


def test_eval_and_predict_classification(tmp_path, ring_shards):
    run = tmp_path / "cls"
    trained_run(run, config(ring_shards, data={"target": "cls"}, train={"max_steps": 2, "loss": "ce"}))
    assert cli(["eval", str(run)]) == 0
    report = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert {"accuracy", "auc"} <= set(report["metrics"]) and 0 <= report["metrics"]["accuracy"] <= 1
    assert (run / "eval" / "test" / "roc_confusion.png").is_file()
    out = tmp_path / "p.csv"
    assert cli(["predict", str(run), "--shards", str(ring_shards), "--out", str(out)]) == 0
    header, rows = read_csv(out)
    assert header == ["key", "index", "cls", "prob_low", "prob_high", "true_cls"] and len(rows) == 18
    for r in rows:
        p = [float(r["prob_low"]), float(r["prob_high"])]
        assert sum(p) == pytest.approx(1, abs=1e-5) and r["cls"] == ["low", "high"][int(np.argmax(p))]
        assert r["true_cls"] in ("low", "high")


def test_checkpoint_choice(run_dir):
    scored = {p: read_meta(p)["metrics"]["val/loss"] for _, p in list_checkpoints(run_dir / "checkpoints")}
    best, why = choose_checkpoint(run_dir, "best", "val/loss", "min")
    assert best == min(scored, key=scored.get) and "best by val/loss" in why
    assert choose_checkpoint(run_dir, "best", "val/loss", "max")[0] == max(scored, key=scored.get)
    latest = max(scored, key=lambda p: p.name)
    path, why = choose_checkpoint(run_dir, "best", "val/nothing", "min")
    assert path == latest and "no checkpoint records val/nothing" in why
    assert choose_checkpoint(run_dir, "latest", "val/loss", "min")[0] == latest


def test_eval_and_predict_errors_exit_2(run_dir, ring_shards, tmp_path, capsys):
    assert cli(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err

    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert cli(["eval", str(empty)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err

    assert cli(["eval", str(run_dir), "--split", "holdout"]) == 2
    assert "split 'holdout' is not in" in (err := capsys.readouterr().err) and "train (84), val (18), test (18)" in err
    assert cli(["predict", str(run_dir), "--shards", str(ring_shards), "--split", "holdout", "--out",
                str(tmp_path / "x.csv")]) == 2
    assert cli(["predict", str(run_dir), "--shards", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert cli(["eval", str(run_dir), "--tta", "5"]) == 2
    assert not (tmp_path / "x.csv").exists()



def test_eval_on_another_shard_set_writes_beside_the_runs_own(run_dir, ring_shards, tmp_path):
    import shutil

    other = tmp_path / "copy-of-rings"
    shutil.copytree(ring_shards, other)
    assert cli(["eval", str(run_dir), "--split", "val"]) == 0
    own = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    assert cli(["eval", str(run_dir), "--split", "val", "--shards", str(other)]) == 0
    report = json.loads((run_dir / "eval" / "copy-of-rings-val" / "metrics.json").read_text())
    assert report["metrics"] == own["metrics"]  # the same samples, decoded with the same statistics
    assert json.loads((run_dir / "eval" / "val" / "metrics.json").read_text()) == own  # untouched
