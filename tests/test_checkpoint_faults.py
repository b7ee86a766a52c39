"""Checkpoints under faults: the one rule for the best checkpoint, hostile files, a file-size limit mid-run."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from lenstrain.checkpointing.checkpoint import (
    COMPLETE,
    best_checkpoint,
    estimate_checkpoint_bytes,
    free_space_warning,
    latest_complete,
    list_checkpoints,
    load_model_state,
    step_dir_name,
    verify_checkpoint,
)
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.checkpointing.stateio import (
    UntrustedFileError,
    load_listed_pickle,
    load_rng_file,
    load_state_file,
    rng_state,
    save_state_file,
    set_rng_state,
    sha256_file,
)
from lenstrain.models import create_model
from lenstrain.run.preemption import EXIT_CHECKPOINT_FAILED, EXIT_REQUEUE
from tests.factories import assert_same_weights, final_weights, write_config
from tests.train_helpers import ROOT, env, lenstrain, train_until_signalled

# ------------------------------------------------------------------------------------ the best checkpoint


def fake_checkpoint(root, step: int, metrics: dict, complete: bool = True):
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}))
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_best_checkpoint_newer_wins_ties_and_never_picks_non_finite(tmp_path):
    fake_checkpoint(tmp_path, 1, {"val/loss": 0.5})
    tied_newer = fake_checkpoint(tmp_path, 2, {"val/loss": 0.5})
    fake_checkpoint(tmp_path, 3, {"val/loss": math.nan})
    fake_checkpoint(tmp_path, 4, {"val/loss": -math.inf})
    fake_checkpoint(tmp_path, 5, {"val/loss": 0.1}, complete=False)
    fake_checkpoint(tmp_path, 6, {"val/r2": 0.9})
    assert best_checkpoint(tmp_path, "val/loss", "min") == tied_newer
    assert best_checkpoint(tmp_path, "val/r2", "max") == tmp_path / step_dir_name(6)
    assert best_checkpoint(tmp_path, "val/loss", "max") == tied_newer
    assert best_checkpoint(tmp_path, "val/nothing", "min") is None
    assert best_checkpoint(tmp_path, None, "min") is None


# ------------------------------------------------------------------------------------ hostile files


class RunsCommand:
    """Pickles as a call of ``os.system``: loading it with a full unpickle creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_rng_file_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    rng_file = tmp_path / "rng-rank0.pt"
    torch.save({**rng_state(), "python": RunsCommand(marker)}, rng_file)
    with pytest.raises(UntrustedFileError, match="posix.system"):
        load_rng_file(rng_file)
    with pytest.raises(UntrustedFileError):
        load_state_file(rng_file)
    assert not marker.exists()

    save_state_file(rng_state(), rng_file)  # what a run writes loads: tensors, lists and numbers only
    assert torch.equal(load_rng_file(rng_file)["torch"], torch.get_rng_state())


def test_an_rng_file_of_the_earlier_format_still_restores_the_generators(tmp_path):
    """Earlier versions saved the generators' own tuples, with numpy's state as an array."""
    rng_file = tmp_path / "rng-rank0.pt"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, rng_file)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(load_rng_file(rng_file))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_deepspeed_files_are_unpickled_only_as_the_complete_marker_lists_them(tmp_path):
    step_dir = tmp_path / step_dir_name(4)
    (step_dir / "deepspeed").mkdir(parents=True)
    listed, dropped = step_dir / "deepspeed" / "listed.pt", step_dir / "deepspeed" / "dropped.pt"
    torch.save({"module": {"w": torch.ones(2)}}, listed)
    entry = {"bytes": listed.stat().st_size, "sha256": sha256_file(listed)}
    (step_dir / COMPLETE).write_text(json.dumps({"step": 4, "files": {"deepspeed/listed.pt": entry}}))
    assert torch.equal(load_listed_pickle(listed, step_dir)["module"]["w"], torch.ones(2))

    marker = tmp_path / "ran"
    torch.save(RunsCommand(marker), dropped)
    with pytest.raises(UntrustedFileError, match="not listed"):
        load_listed_pickle(dropped, step_dir)
    torch.save(RunsCommand(marker), listed)  # the listed file replaced afterwards
    with pytest.raises(UntrustedFileError, match="refusing to unpickle"):
        load_listed_pickle(listed, step_dir)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ disk space


def test_checkpoint_estimate_matches_what_a_checkpoint_writes_and_warns_under_twice(tmp_path):
    model = create_model("alternet_tiny", in_channels=1, num_outputs=1, image_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before_step = estimate_checkpoint_bytes(model, optimizer)  # the moments counted before they exist
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    optimizer.step()
    save_state_file(model.state_dict(), tmp_path / "model.pt")
    save_state_file(optimizer.state_dict(), tmp_path / "optimizer.pt")
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    for estimate in (before_step, estimate_checkpoint_bytes(model, optimizer)):
        assert 0.9 * written < estimate <= written, (estimate, written)

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert free_space_warning(tmp_path, free // 4) is None
    warning = free_space_warning(tmp_path / "runs" / "new", free)  # a run directory not made yet
    assert warning is not None and "free" in warning and str(tmp_path / "runs" / "new") in warning


# ------------------------------------------------------------------------------------ a failed write mid-run


def train_with_file_size_limit(config, run_dir, limit: int, nproc: int) -> subprocess.CompletedProcess:
    """``lenstrain train`` where no file may grow past ``limit`` bytes: writes beyond it fail with EFBIG."""

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cmd = [sys.executable, "-m", "lenstrain", "train", str(config), "--run-dir", str(run_dir), "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300, preexec_fn=limit_files)


@pytest.mark.slow  # four training processes
@pytest.mark.parametrize("nproc", [pytest.param(1, id="single"), pytest.param(2, id="ddp2", marks=pytest.mark.multiprocess)])
def test_a_checkpoint_that_cannot_be_written_exits_cleanly_and_the_run_resumes_exactly(tmp_path, ring_shards, nproc):
    """Rank 0's model.pt passes the limit while rank 1's files do not: every rank must stop, with one line."""
    config = write_config(tmp_path / "c.yaml", ring_shards, checkpoint={"every_steps": 4, "keep": 3, "every_minutes": None})
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, "--nproc", nproc, check=True)

    run = RunDir(tmp_path / "run")
    code, out = train_until_signalled(config, run.root, at_step=2, nproc=nproc)  # a checkpoint at the stop
    assert code == EXIT_REQUEUE, out
    # The signal may land after the periodic checkpoint of step 4 on a fast machine: the newest is where the
    # next attempt resumes, and whatever was written before the stop must survive the failed write unchanged.
    before = list_checkpoints(run.checkpoints)
    first = before[-1][1]
    first_files = {p.name: p.read_bytes() for p in first.iterdir()}
    limit = min(len(first_files["model.pt"]), len(first_files["optimizer.pt"])) // 2

    failed = train_with_file_size_limit(config, run.root, limit, nproc)  # the second checkpoint cannot be written
    assert failed.returncode == EXIT_CHECKPOINT_FAILED, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    [line] = [s for s in failed.stdout.splitlines() if "could not be written" in s]
    assert "File too large" in line and "free" in line and str(first) in line, line
    assert f"resumed from {first}" in failed.stdout
    assert list_checkpoints(run.checkpoints) == before
    assert not list(run.checkpoints.glob("*.tmp"))
    assert verify_checkpoint(first) is None
    assert {p.name: p.read_bytes() for p in first.iterdir()} == first_files
    assert load_model_state(first).keys() == final_weights(straight).keys()

    lenstrain("train", config, "--run-dir", run.root, "--nproc", nproc, check=True)  # with room again
    assert latest_complete(run.checkpoints).name == step_dir_name(12)
    assert_same_weights(final_weights(straight), final_weights(run.root))
