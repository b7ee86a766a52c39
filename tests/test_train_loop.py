"""The loop's exits clean up after themselves: the non-finite-loss exit restores the signal handlers and
closes TensorBoard (its events are on disk), and the loop never writes the run's config. Each log carries
TFLOP/s (and MFU, given a peak) to TensorBoard and progress.json."""

from __future__ import annotations

import json
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.status import fmt_number, run_summary
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.config.schema import load_config
from lenstrain.run.preemption import DEFAULT_SIGNALS, EXIT_NONFINITE
from lenstrain.run.train import run_training
from tests.factories import config_dict


def test_the_nonfinite_exit_restores_handlers_and_closes_tensorboard(tmp_path, ring_shards):
    cfg = load_config(config_dict(ring_shards, optim={"name": "sgd", "lr": 1e12},
                                  train={"max_steps": 30, "grad_clip": None, "deterministic": False},
                                  checkpoint={"every_steps": 0}))
    before = {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS}
    run = RunDir(tmp_path / "run")
    assert run_training(cfg, run.root) == EXIT_NONFINITE
    assert {sig: signal.getsignal(sig) for sig in DEFAULT_SIGNALS} == before
    progress = json.loads(run.progress.read_text())
    assert progress["state"] == "failed" and progress["step"] < 30
    events = EventAccumulator(str(run.tb))
    events.Reload()
    logged = [e.step for e in events.Scalars("train/loss")]
    assert logged == list(range(1, progress["step"] + 1))  # every step taken, on disk: the writer was closed
    assert not run.config.exists()  # written at the edge (the CLI, the launcher), never by the loop


def test_tflops_reach_tensorboard_and_progress_and_mfu_follows_the_peak_override(tmp_path, ring_shards):
    cfg = load_config(config_dict(ring_shards, train={"max_steps": 4}, log={"every_steps": 2, "peak_tflops": 0.5},
                                  checkpoint={"every_steps": 0}))
    run = RunDir(tmp_path / "run")
    assert run_training(cfg, run.root) == 0
    events = EventAccumulator(str(run.tb))
    events.Reload()
    tflops = {e.step: e.value for e in events.Scalars("perf/tflops")}
    mfu = {e.step: e.value for e in events.Scalars("perf/mfu")}
    assert sorted(tflops) == sorted(mfu) == [2, 4]
    assert all(value > 0 for value in tflops.values())
    assert all(abs(mfu[step] - tflops[step] / 0.5) < 1e-6 * mfu[step] for step in mfu)
    progress = json.loads(run.progress.read_text())
    assert progress["state"] == "done" and progress["tflops"] == pytest.approx(tflops[4], rel=1e-6)
    assert progress["mfu"] == pytest.approx(mfu[4], rel=1e-6)
    row = run_summary(run.root, {"jobs": []})  # what `launcher status` shows of the run
    assert row["tflops"] == fmt_number(progress["tflops"]) and row["mfu"] == f"{progress['mfu']:.1%}"
