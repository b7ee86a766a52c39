"""What the sweep tests share: a one-task base job on the ring shards, sweep files around it, and the checks of
a cancelled sweep and of its resume."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from optuna.trial import FrozenTrial, TrialState

from launcher import runs
from launcher.sweep.study import open_study, read_sweep_dir
from lenstrain.checkpointing.checkpoint import read_meta
from lenstrain.checkpointing.rundir import RunDir
from tests.factories import config_dict, merged

ONE_TASK = {
    "cluster": "devcluster",
    "nodes": 1,
    "tasks_per_node": 1,
    "cpus_per_task": 1,
    "time": 10,
    "signal_delay_s": 30,
    "max_requeues": 3,
}


def write_base(tmp: Path, shards: Path, steps: int = 12, **sections) -> Path:
    """A one-task job: alternet_tiny, ``steps`` steps, a validation and a checkpoint every 4."""
    job = merged(
        config_dict(shards),
        resources=ONE_TASK,
        train={"max_steps": steps, "val_every_steps": 4},
        checkpoint={"every_steps": 4, "keep": 2, "best_metric": "val/loss"},
    )
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(merged(job, **sections), sort_keys=False))
    return path


def write_sweep(tmp: Path, base_job: Path, name: str = "sw", **keys) -> Path:
    sweep = {
        "name": name,
        "base": str(base_job),
        "sampler": "tpe",
        "pruner": "none",
        "trials": 2,
        "parallel": 1,
        "seed": 0,
        "space": {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}},
    }
    sweep.update(keys)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def study_of(root: Path):
    spec, _ = read_sweep_dir(root)
    return open_study(root, spec)


def has_checkpoint(run_dir: Path) -> bool:
    return any((p / "COMPLETE").is_file() for p in (run_dir / "checkpoints").glob("step-*"))


def reported_steps(root: Path) -> list[tuple[int, int]]:
    """Every (trial id, step) the study's journal holds a report of, in the order written, repeats included."""
    ops = (json.loads(line) for line in (root / "study.journal").read_text().splitlines() if line)
    return [(op["trial_id"], op["step"]) for op in ops if op["op_code"] == 7]  # SET_TRIAL_INTERMEDIATE_VALUE


def last_outcome(run_dir: Path) -> str:
    return runs.read_jobs(run_dir)["jobs"][-1]["attempts"][-1]["outcome"]


def stopped_trials(root: Path, steps: int) -> tuple[dict[int, FrozenTrial], set[int]]:
    """After a cancel: the RUNNING trials, and the numbers of those that had started training.

    None is FAIL. One that had started stopped at a checkpoint of its own last step (SIGTERM) and its attempt
    is ``cancelled``; one claimed and not started yet was handed back (orphaned) by its worker."""
    trials = study_of(root).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.FAIL], [t.user_attrs for t in trials]
    stopped = {t.number: t for t in trials if t.state == TrialState.RUNNING}
    started = {n for n in stopped if has_checkpoint(root / f"trial-{n:04d}")}
    for number in started:
        run = root / f"trial-{number:04d}"
        progress = json.loads((run / "progress.json").read_text())
        step = progress["step"]
        assert progress["state"] == "preempted" and 0 < step < steps, progress
        ckpt = RunDir(run).checkpoints / f"step-{step:08d}"  # one checkpoint per step: a periodic one may be it
        assert read_meta(ckpt)["reason"] in ("signal 15", "periodic") and (ckpt / "COMPLETE").is_file()
        assert last_outcome(run) == "cancelled"
    for number in set(stopped) - started:
        assert stopped[number].user_attrs["orphaned"], stopped[number].user_attrs
    return stopped, started


def check_orphaned(root: Path, stopped: dict[int, FrozenTrial]) -> None:
    """After ``status`` reaped: exactly the stopped trials are RUNNING, each ownerless and orphaned."""
    running = study_of(root).get_trials(states=(TrialState.RUNNING,))
    assert {t.number for t in running} == set(stopped)
    for trial in running:
        assert trial.user_attrs["orphaned"] and trial.user_attrs["owner"] is None


def check_resumed(
    root: Path, stopped: dict[int, FrozenTrial], started: set[int], steps: int, trials: int
) -> None:
    """After resume: the study has its count, all COMPLETE; each stopped trial finished under its number with
    its parameters, every validation reported, and no step reported twice across its attempts."""
    done = study_of(root).get_trials()
    assert [t.state for t in done] == [TrialState.COMPLETE] * trials  # the count, no extra trial
    for number, before in stopped.items():
        trial = done[number]
        assert trial.params == before.params
        assert sorted(trial.intermediate_values) == list(range(4, steps + 1, 4))
        jobs = runs.read_jobs(root / f"trial-{number:04d}")["jobs"]
        outcomes = [a["outcome"] for j in jobs for a in j["attempts"]]
        assert outcomes == (["cancelled", "completed"] if number in started else ["completed"]), outcomes
    reports = reported_steps(root)
    assert len(reports) == len(set(reports)) == trials * (steps // 4)
