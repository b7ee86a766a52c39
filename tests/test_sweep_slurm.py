"""Sweeps on the real devcluster: one job array of workers runs a TPE study to its count, and a trial
preempted by the urgent partition checkpoints, requeues, resumes under the same number and ends with the
weights of an unpreempted run of the same parameters; a cancelled array's trials wait for `resume`, whose
array finishes them under their numbers. ``-s`` prints the wall time and the steps pruning saved."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from launcher import runs
from launcher.__main__ import main
from lenstrain.checkpointing.checkpoint import best_checkpoint, read_meta
from lenstrain.checkpointing.rundir import RunDir
from tests.factories import assert_same_weights, final_weights
from tests.slurm_helpers import sacct_records, sbatch, scancel, squeue_jobs, wait_for
from tests.sweep_helpers import (
    ONE_TASK,
    check_orphaned,
    check_resumed,
    has_checkpoint,
    stopped_trials,
    study_of,
    write_base,
    write_sweep,
)

pytestmark = pytest.mark.slurm


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    assert squeue_jobs() == [], "the devcluster has jobs already"
    yield slurm_cluster
    scancel(*[j["jobid"] for j in squeue_jobs()])


def array_of(root: Path) -> str:
    jobs = runs.read_jobs(root)["jobs"]
    assert len(jobs) == 1 and jobs[0]["kind"] == "slurm"  # ONE job array
    return jobs[0]["job_id"]


def wait_sweep(root: Path, array: str, trials: int, timeout: float = 300) -> list:
    """Until the study has ``trials`` finished trials and the array has left the queue."""

    def finished():
        done = [t for t in study_of(root).get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        gone = not [j for j in squeue_jobs() if j["jobid"].startswith(f"{array}_")]
        return len(done) >= trials and gone

    try:
        wait_for(finished, timeout, interval=1.0, what=f"sweep {root.name} to reach {trials} trials")
    except TimeoutError:
        logs = "".join(p.read_text() for p in sorted((root / "submitit").glob("*_log.*")))
        raise AssertionError(f"sweep {root.name} did not finish:\n{logs[-6000:]}") from None
    return study_of(root).get_trials()


def wait_until_trial_zero_trains(root: Path) -> None:
    progress = root / "trial-0000" / "progress.json"
    wait_for(
        lambda: progress.is_file() and json.loads(progress.read_text())["step"] >= 5,
        120,
        interval=0.05,
        what="trial 0 to train",
    )


def test_a_tpe_sweep_runs_as_one_array_to_its_count(cluster, tmp_path, ring_shards, capsys):
    base = write_base(tmp_path, ring_shards, steps=16)
    sweep = write_sweep(
        tmp_path,
        base,
        name="tpe",
        sampler="tpe",
        pruner="median",
        trials=6,
        parallel=2,
        pruner_options={"n_startup_trials": 2},
        space={"optim.lr": {"log_uniform": [1.0e-5, 1.0e-1]}, "optim.name": {"choice": ["adam", "sgd"]}},
    )
    root = tmp_path / "runs" / "tpe"
    t0 = time.time()
    assert cli("sweep", sweep, "--runs-dir", tmp_path / "runs") == 0
    array = array_of(root)
    assert "--array=0-1%2" in capsys.readouterr().out
    trials = wait_sweep(root, array, 6)
    wall = time.time() - t0
    assert len(trials) == 6 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert {r["jobid"] for r in sacct_records(array, duplicates=False)} >= {f"{array}_0", f"{array}_1"}
    study = study_of(root)
    best = study.best_trial
    # The trial's value is the metric at the checkpoint `lenstrain eval` loads: the run's best by val/loss
    # (tests/test_sweep_local.py runs eval itself and compares).
    checkpoints = RunDir(root / f"trial-{best.number:04d}").checkpoints
    chosen = best_checkpoint(checkpoints, "val/loss", "min")
    meta = read_meta(chosen)
    assert chosen.name == f"step-{best.user_attrs['value_step']:08d}"
    assert study.best_value == meta["metrics"]["val/loss"]
    assert read_meta(runs.newest_checkpoint(checkpoints.parent))["step"] == 16
    capsys.readouterr()
    assert cli("status", "tpe", "--runs-dir", tmp_path / "runs") == 0
    out = capsys.readouterr().out
    assert (
        f"{array} │ slurm │ COMPLETED" in out
        and "6/6 trials done" in out
        and f"best: trial {best.number}," in out
    )
    ran = sum(
        json.loads((root / f"trial-{t.number:04d}" / "progress.json").read_text())["step"] for t in trials
    )
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    with capsys.disabled():
        print(
            f"\nsweep of 6 trials x 16 steps, 2 at once on the devcluster: {wall:.0f} s wall; {pruned} pruned; "
            f"trial steps run {ran} of {6 * 16} requested ({1 - ran / 96:.0%} saved)"
        )


def test_a_preempted_trial_resumes_under_its_number_bit_identically(cluster, tmp_path, ring_shards):
    base = write_base(
        tmp_path,
        ring_shards,
        steps=40,
        checkpoint={"every_steps": 10, "keep": 10},
        train={"val_every_steps": 10},
    )
    sweep = write_sweep(
        tmp_path,
        base,
        name="pre",
        sampler="grid",
        trials=None,
        parallel=1,
        space={"optim.lr": {"choice": [2.0e-3]}},
    )
    root = tmp_path / "runs" / "pre"
    assert cli("sweep", sweep, "--runs-dir", tmp_path / "runs") == 0
    array = array_of(root)
    wait_until_trial_zero_trains(root)
    urgent = sbatch("-p", "urgent", "-N2", "-c2", "-J", "urgent", "-o", "/dev/null", "--wrap", "sleep 2")
    (trial,) = wait_sweep(root, array, 1)
    assert trial.number == 0 and trial.state == TrialState.COMPLETE
    job = runs.read_jobs(root / "trial-0000")["jobs"]
    assert len(job) == 1 and [a["outcome"] for a in job[0]["attempts"]] == ["requeued", "completed"], job
    assert sacct_records(urgent, duplicates=False)[-1]["state"] == "COMPLETED"
    assert sorted(trial.intermediate_values) == [10, 20, 30, 40]  # each step reported once across attempts

    # The same parameters, uninterrupted: the trial's own job run on this machine.
    assert (
        cli(
            "submit",
            root / "trial-0000" / "job.yaml",
            "--local",
            "--nproc",
            "1",
            "--runs-dir",
            tmp_path / "ref",
            "--name",
            "ref",
        )
        == 0
    )
    assert_same_weights(final_weights(tmp_path / "ref" / "ref"), final_weights(root / "trial-0000"))


def arrays_of(root: Path) -> list[str]:
    return [j["job_id"] for j in runs.read_jobs(root)["jobs"] if j["kind"] == "slurm"]


def test_a_cancelled_sweep_array_resumes_its_trials_under_their_numbers(cluster, tmp_path, ring_shards, capsys):
    steps = 40
    base = write_base(tmp_path, ring_shards, steps=steps)
    sweep = write_sweep(tmp_path, base, name="cr", trials=3, parallel=2, sampler="random")
    runs_dir, root = tmp_path / "runs", tmp_path / "runs" / "cr"
    assert cli("sweep", sweep, "--runs-dir", runs_dir) == 0
    (first,) = arrays_of(root)
    wait_for(
        lambda: all(has_checkpoint(root / f"trial-{n:04d}") for n in (0, 1)),
        120,
        interval=0.05,
        what="both array tasks' trials to checkpoint",
    )
    capsys.readouterr()
    assert cli("cancel", "cr", "--runs-dir", runs_dir) == 0
    assert f"cancelled sweep cr ({first})" in capsys.readouterr().out
    wait_for(
        lambda: not [j for j in squeue_jobs() if j["jobid"].startswith(f"{first}_")],
        90,
        what=f"array {first} to leave the queue",
    )
    stopped, started = stopped_trials(root, steps)
    assert started & {0, 1}, stopped
    assert cli("status", "cr", "--runs-dir", runs_dir) == 0  # reaps: the array tasks are gone
    assert "waiting for a worker to resume it" in capsys.readouterr().out
    check_orphaned(root, stopped)

    assert cli("resume", "cr", "--runs-dir", runs_dir) == 0
    second = arrays_of(root)[-1]
    assert second != first and "--array=0-1%2" in capsys.readouterr().out
    wait_sweep(root, second, 3)
    check_resumed(root, stopped, started, steps, trials=3)
    for number in stopped:  # the resumed array's tasks finished them
        jobs = runs.read_jobs(root / f"trial-{number:04d}")["jobs"]
        assert jobs[-1]["array"].startswith(f"{second}_"), jobs


def test_a_two_node_trial_trains_on_both_nodes_and_survives_preemption(cluster, tmp_path, ring_shards):
    """Any job may be the base: with 2 nodes x 1 task, each array task is 2 SLURM tasks; the first claims the
    trials and the other follows, so each trial is one 2-rank run. Preempted, trial 0 requeues with its array
    task, resumes under its number on both nodes, and ends identical to the same job run by hand."""
    two_nodes = {"nodes": 2, "tasks_per_node": 1}
    base = write_base(
        tmp_path,
        ring_shards,
        steps=40,
        resources={**ONE_TASK, **two_nodes},
        checkpoint={"every_steps": 10, "keep": 10},
        train={"val_every_steps": 10},
    )
    space = {"optim.lr": {"choice": [1.0e-3, 3.0e-3]}}
    sweep = write_sweep(tmp_path, base, name="wide", sampler="grid", trials=None, parallel=1, space=space)
    root = tmp_path / "runs" / "wide"
    assert cli("sweep", sweep, "--runs-dir", tmp_path / "runs") == 0
    wait_until_trial_zero_trains(root)
    sbatch("-p", "urgent", "-N2", "-c2", "-J", "urgent", "-o", "/dev/null", "--wrap", "sleep 2")
    trials = wait_sweep(root, array_of(root), 2)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert len({t.user_attrs["owner"]["job"] for t in trials}) == 1  # one array task ran both, in turn
    outcomes, restarts = {}, {}
    for trial in trials:
        (job,) = runs.read_jobs(root / f"trial-{trial.number:04d}")["jobs"]
        assert all(a["world_size"] == 2 and a["nodes"] == "n[1-2]" for a in job["attempts"]), job
        outcomes[trial.number] = [a["outcome"] for a in job["attempts"]]
        restarts[trial.number] = (job["requeues"], [a["restart_count"] for a in job["attempts"]])
    assert outcomes == {0: ["requeued", "completed"], 1: ["completed"]}
    # Trial 1 began on the array task's second attempt, and counts only its own requeues (none) against
    # resources.max_requeues: a worker's preemptions in one trial do not use up the next trial's.
    assert restarts == {0: (1, [0, 1]), 1: (0, [0])}
    assert sorted(trials[0].intermediate_values) == [10, 20, 30, 40]
    job = root / "trial-0000" / "job.yaml"
    assert cli("submit", job, "--local", "--nproc", "2", "--runs-dir", tmp_path / "ref", "--name", "ref") == 0
    assert_same_weights(final_weights(tmp_path / "ref" / "ref"), final_weights(root / "trial-0000"))
