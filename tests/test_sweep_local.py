"""``launcher sweep --local``: real Optuna journal studies, real worker processes, real training.

A grid runs each combination exactly once with 2 workers racing; a pruner stops a diverging trial (PRUNED,
checkpoint kept, TensorBoard hparams written); a worker killed with SIGKILL leaves its trial FAIL, its
parameters re-enqueued, and the study still reaches its count; status shows the trials and the report
writes best.yaml, trials.csv and the plots; the study's best is the best trial's own `lenstrain eval`
metric; `launcher cancel` stops the workers at checkpoints and `launcher resume --local` finishes the
stopped trials under their numbers and the study at its count.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from launcher.__main__ import main
from lenstrain.checkpointing.checkpoint import read_meta
from lenstrain.checkpointing.rundir import RunDir
from tests.slurm_helpers import wait_for
from tests.sweep_helpers import (
    check_orphaned,
    check_resumed,
    has_checkpoint,
    stopped_trials,
    study_of,
    write_base,
    write_sweep,
)

REPO = Path(__file__).resolve().parents[1]


def sweep_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.multiprocess
def test_grid_runs_each_combination_exactly_once_with_two_workers(tmp_path, ring_shards):
    base = write_base(tmp_path, ring_shards, steps=4)
    space = {"optim.name": {"choice": ["adam", "adamw"]}, "optim.lr": {"choice": [1.0e-3, 3.0e-3]}}
    sweep = write_sweep(tmp_path, base, name="grid", sampler="grid", trials=None, parallel=2, space=space)
    assert sweep_cli("sweep", sweep, "--local", "--runs-dir", tmp_path / "runs") == 0
    trials = study_of(tmp_path / "runs" / "grid").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    combos = sorted((t.params["optim.name"], t.params["optim.lr"]) for t in trials)
    assert combos == sorted((n, lr) for n in ("adam", "adamw") for lr in (1.0e-3, 3.0e-3))
    workers = {t.user_attrs["owner"]["pid"] for t in trials}
    assert len(workers) == 2  # both workers took trials


@pytest.mark.multiprocess
def test_a_diverging_trial_is_pruned_and_keeps_its_checkpoint(tmp_path, ring_shards, capsys):
    base = write_base(tmp_path, ring_shards, steps=12)
    sweep = write_sweep(
        tmp_path,
        base,
        name="prune",
        sampler="grid",
        trials=None,
        parallel=1,
        pruner="median",
        pruner_options={"n_startup_trials": 1},
        space={"optim.lr": {"choice": [1.0e-3, 5.0]}},
    )
    root = tmp_path / "runs" / "prune"
    assert sweep_cli("sweep", sweep, "--local", "--runs-dir", tmp_path / "runs") == 0
    first, diverging = study_of(root).get_trials()
    assert first.state == TrialState.COMPLETE and diverging.state == TrialState.PRUNED
    pruned_at = max(diverging.intermediate_values)
    assert pruned_at < 12 and diverging.params == {"optim.lr": 5.0}
    run = RunDir(root / "trial-0001")
    ckpt = run.checkpoints / f"step-{pruned_at:08d}"
    assert read_meta(ckpt)["reason"] in ("pruned", "periodic") and (ckpt / "COMPLETE").is_file()
    assert json.loads(run.progress.read_text())["state"] == "pruned"
    assert runs_outcome(root / "trial-0001") == "pruned"
    assert hparams_of(run.tb)["optim.lr"] == 5.0  # TensorBoard's HPARAMS tab compares pruned trials too
    # The study's best is the best trial's own `lenstrain eval` metric on the validation split: eval loads
    # the run's best checkpoint (by checkpoint.best_metric), which here is not its last (the val/loss of this
    # trial is lowest at step 4), and the trial's value is the metric recorded at that checkpoint.
    study = study_of(root)
    assert study.best_trial.number == 0
    trial_dir = root / "trial-0000"
    done = subprocess.run(
        [sys.executable, "-m", "lenstrain", "eval", str(trial_dir), "--split", "val"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    evaluated = json.loads((trial_dir / "eval" / "val" / "metrics.json").read_text())
    assert evaluated["step"] == first.user_attrs["value_step"]
    assert study.best_value == pytest.approx(evaluated["metrics"]["loss"], rel=1e-6, abs=0)

    capsys.readouterr()
    assert sweep_cli("status", "prune", "--runs-dir", tmp_path / "runs") == 0
    out = capsys.readouterr().out
    assert "PRUNED" in out and "COMPLETE" in out and "best: trial 0, val/loss" in out
    assert sweep_cli("sweep", "report", "prune", "--runs-dir", tmp_path / "runs") == 0
    report = root / "report"
    for name in (
        "best.yaml",
        "trials.csv",
        "optimization_history.png",
        "intermediate_values.png",
        "parallel_coordinate.png",
    ):
        assert (report / name).is_file(), name
    best = yaml.safe_load((report / "best.yaml").read_text())
    assert best["optim"]["lr"] == 1.0e-3 and best["name"] == "prune-best"
    rows = list(csv.DictReader((report / "trials.csv").open()))
    assert len(rows) == 2 and rows[0]["value_step"] == str(first.user_attrs["value_step"])


def runs_outcome(run_dir: Path) -> str:
    jobs = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    return jobs[-1]["attempts"][-1]["outcome"]


def hparams_of(tb: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            return {
                k: v.number_value if v.HasField("number_value") else v.string_value
                for k, v in data.session_start_info.hparams.items()
            }
    raise AssertionError("no hparams in " + str(tb))


@pytest.mark.multiprocess
def test_a_killed_worker_fails_its_trial_which_is_reenqueued(tmp_path, ring_shards):
    base = write_base(tmp_path, ring_shards, steps=60)
    sweep = write_sweep(tmp_path, base, name="killed", trials=2, parallel=1, sampler="random")
    root = tmp_path / "runs" / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "sweep",
            str(sweep),
            "--local",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        progress = root / "trial-0000" / "progress.json"
        wait_for(
            lambda: progress.is_file() and json.loads(progress.read_text())["step"] >= 3,
            120,
            what="trial 0 to train",
        )
        pids = json.loads((root / "jobs.json").read_text())["jobs"][-1]["worker_pids"]
        os.kill(pids[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "worker 0 was killed by SIGKILL" in out and "marked FAIL, its parameters are enqueued again" in out
    trials = study_of(root).get_trials()
    killed = trials[0]
    assert killed.state == TrialState.FAIL and killed.user_attrs["retried"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def launcher_proc(*argv, **kw) -> subprocess.Popen:
    """``python -m launcher ARGV`` as its own process, output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def launcher_run(*argv, timeout: float = 240) -> tuple[int, str]:
    proc = launcher_proc(*argv)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.multiprocess
def test_a_cancelled_sweep_resumes_its_stopped_trials_under_their_numbers(tmp_path, ring_shards):
    # Long enough that the cancel (a new process) lands while both trials still train: with models importing
    # only their own family, 60 steps of alternet_tiny could finish before it.
    steps = 200
    base = write_base(tmp_path, ring_shards, steps=steps)
    sweep = write_sweep(tmp_path, base, name="cr", trials=3, parallel=2, sampler="random")
    runs_dir, root = tmp_path / "runs", tmp_path / "runs" / "cr"
    proc = launcher_proc("sweep", sweep, "--local", "--runs-dir", runs_dir)
    try:
        wait_for(
            lambda: all(has_checkpoint(root / f"trial-{n:04d}") for n in (0, 1)),
            120,
            interval=0.05,
            what="both workers' trials to checkpoint",
        )
        pids = json.loads((root / "jobs.json").read_text())["jobs"][-1]["worker_pids"]
        code, said = launcher_run("cancel", "cr", "--runs-dir", runs_dir, timeout=60)
        assert code == 0 and "cancelled sweep cr" in said, said
        assert "python -m launcher resume cr --local" in said
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 42 and "sweep cr: stopped" in out, out  # EXIT_REQUEUE: stopped, resumable
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]

    # A trial that was training stopped at a checkpoint of its own last step; one claimed a moment before the
    # cancel and not started yet (a worker that had just finished its first) was handed back at once.
    # Both stay RUNNING for resume.
    stopped, started = stopped_trials(root, steps)
    assert started & {0, 1}, stopped

    # status reaps: the owners are gone, the trials wait ownerless (orphaned) for the next worker.
    code, shown = launcher_run("status", "cr", "--runs-dir", runs_dir, timeout=60)
    assert code == 0 and "waiting for a worker to resume it" in shown, shown
    check_orphaned(root, stopped)

    code, out = launcher_run("resume", "cr", "--local", "--runs-dir", runs_dir)
    assert code == 0, out
    check_resumed(root, stopped, started, steps, trials=3)
    for number in started:
        assert f"trial {number} (resuming)" in out


def test_local_workers_get_one_gpu_each_round_robin(monkeypatch):
    from launcher import local
    from launcher.sweep.submit import worker_gpus

    assert worker_gpus(3) == [None, None, None]  # this machine: no GPU, nothing to pin
    # No CUDA here: local_devices is made to report GPUs, the one thing this test cannot have for real.
    monkeypatch.setattr(local, "local_devices", lambda: ("cuda", 2))
    assert worker_gpus(3, {}) == ["0", "1", "0"]
    assert worker_gpus(3, {"CUDA_VISIBLE_DEVICES": "4, 6"}) == ["4", "6", "4"]
