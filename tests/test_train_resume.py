"""Exact resume, torn checkpoints and preemption, with real processes, signals and gloo groups."""

from __future__ import annotations

import random
import shutil

import pytest

from lenstrain.checkpointing.checkpoint import latest_complete, list_checkpoints, verify_checkpoint
from lenstrain.run.preemption import EXIT_REQUEUE
from tests.factories import assert_same_weights, final_weights, write_config
from tests.train_helpers import lenstrain, train_until_signalled


@pytest.mark.slow  # three training processes
@pytest.mark.parametrize("nproc", [pytest.param(1, id="single"), pytest.param(2, id="ddp2", marks=pytest.mark.multiprocess)])
def test_signal_and_resume_is_bit_identical(tmp_path, ring_shards, nproc):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 10})
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, "--nproc", nproc, check=True)

    resumed = tmp_path / "resumed"
    stop_at = random.Random(nproc).randint(2, 7)
    code, out = train_until_signalled(config, resumed, at_step=stop_at, nproc=nproc)
    assert code == EXIT_REQUEUE, out
    steps = [s for s, _ in list_checkpoints(resumed / "checkpoints")]
    assert steps and max(steps) < 10, steps  # it stopped early, with a checkpoint at the stop
    second = lenstrain("train", config, "--run-dir", resumed, "--nproc", nproc, check=True)
    assert "resumed from" in second.stdout
    assert_same_weights(final_weights(straight), final_weights(resumed))


@pytest.mark.slow  # two training processes
def test_torn_checkpoints_fall_back_to_the_previous_complete_one(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 8},
                          checkpoint={"every_steps": 2, "keep": 4, "every_minutes": None})
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, check=True)
    ckpts = [p for _, p in list_checkpoints(run / "checkpoints")]
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004", "step-00000006", "step-00000008"]

    (ckpts[-1] / "COMPLETE").unlink()  # killed before the marker
    with open(ckpts[-2] / "optimizer.pt", "r+b") as fh:  # a truncated file under a marker
        fh.truncate(100)
    assert verify_checkpoint(ckpts[-2]) is not None
    assert latest_complete(run / "checkpoints", log=lambda m: None) == ckpts[-3]

    again = lenstrain("train", config, "--run-dir", run, check=True)
    assert f"resumed from {ckpts[-3]}" in again.stdout


def test_nonfinite_loss_stops_and_keeps_good_checkpoints(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, optim={"name": "sgd", "lr": 1e12},
                          train={"max_steps": 30, "grad_clip": None},
                          checkpoint={"every_steps": 1, "keep": 50, "every_minutes": None})
    run = tmp_path / "run"
    proc = lenstrain("train", config, "--run-dir", run)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "non-finite loss" in proc.stdout and "at step" in proc.stdout
    for _, path in list_checkpoints(run / "checkpoints"):
        assert verify_checkpoint(path) is None


def test_kill_mid_save_leaves_no_complete_marker(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 4})
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, check=True)
    good = latest_complete(run / "checkpoints")
    torn = run / "checkpoints" / "step-00000099.tmp"
    shutil.copytree(good, torn)
    (torn / "COMPLETE").unlink()
    assert latest_complete(run / "checkpoints") == good
