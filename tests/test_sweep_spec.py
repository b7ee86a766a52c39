"""Sweep files are validated as strictly as jobs: a bad one exits 2 naming the dotted path and submits
nothing; every ready sweep in jobs/sweeps/ validates; --dry-run prints the array script and first trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.__main__ import main
from launcher.sweep.spec import read_sweep
from tests import counting
from tests.sweep_helpers import write_base, write_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "jobs" / "sweeps").glob("*.yaml"))
validations, calls = counting.validations, counting.calls  # fixtures


@pytest.fixture
def base(tmp_path, ring_shards) -> Path:
    return write_base(tmp_path, ring_shards)


BAD = [
    (
        {"space": {"optim.lrr": {"log_uniform": [1e-4, 1e-2]}}},
        "space.optim.lrr: unknown key; valid keys: name, lr",
    ),
    (
        {"space": {"optim.lr": {"log_uniform": [-1e-3, 1e-2]}}},
        "space.optim.lr: log_uniform: a log scale needs low > 0",
    ),
    (
        {"space": {"optim.lr": {"uniform": [1e-2, 1e-4]}}},
        "space.optim.lr: uniform: [0.01, 0.0001] is not a range",
    ),
    (
        {"space": {"optim.lr": {"uniform": [-1e-3, 1e-2]}}},
        "space.optim.lr: Input should be greater than 0 (value -0.001)",
    ),
    ({"space": {"optim.lr": {"gaussian": [0, 1]}}}, "space.optim.lr.gaussian: unknown key"),
    ({"sampler": "grid"}, "space.optim.lr: grid takes choice lists only; this is a log_uniform range"),
    ({"sampler": "bayes"}, "sampler: Input should be 'tpe', 'cmaes', 'nsga2', 'random', 'grid' or 'qmc'"),
    (
        {"pruner": "asha", "pruner_options": {"patience": 2}},
        "pruner_options.patience: unknown option; valid keys: min_resource",
    ),
    ({"base": "no/such/job.yaml"}, "base: no/such/job.yaml: no such job file"),
    ({"trails": 3}, "trails: unknown key; valid keys: name, base"),
    (
        {"space": {"schedule.name": {"choice": ["cosine", "linear_warmup"]}}},
        "space.schedule.name: Input should be",
    ),
]


@pytest.mark.parametrize(("keys", "expected"), BAD, ids=[e.split(":")[0] for _, e in BAD])
def test_bad_sweep_files_exit_2_naming_the_key(tmp_path, base, capsys, keys, expected):
    sweep = write_sweep(tmp_path, base, **keys)
    assert main(["sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()


def test_set_overrides_reach_the_sweep_and_the_base_job(tmp_path, base):
    sweep = write_sweep(tmp_path, base)
    spec, job, _ = read_sweep(
        sweep, ["trials=5", "train.max_steps=7", "space.optim.name={choice: [adam, lion]}"]
    )
    assert (
        spec.trials == 5 and job.train.max_steps == 7 and spec.space["optim.name"].choice == ["adam", "lion"]
    )
    assert spec.metric == "val/loss" and spec.direction == "minimize"  # from the base job's best_metric


def test_grid_trials_default_to_every_combination(tmp_path, base):
    sweep = write_sweep(
        tmp_path,
        base,
        sampler="grid",
        trials=None,
        space={"optim.name": {"choice": ["adam", "adamw"]}, "optim.lr": {"choice": [1e-3, 1e-2, 0.1]}},
    )
    spec, _, _ = read_sweep(sweep)
    assert spec.trials == 6 and len(spec.grid_points()) == 6


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_ready_sweeps_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec, job, _ = read_sweep(path)
    assert spec.name == path.stem and spec.trials and spec.metric and spec.direction
    assert job.resources.world_size == 1  # each of these trials takes one GPU


def test_three_ready_sweeps(monkeypatch):
    monkeypatch.chdir(ROOT)
    samplers = {read_sweep(p)[0].sampler for p in SWEEPS}
    assert len(SWEEPS) >= 3 and {"tpe", "grid"} <= samplers


def test_dry_run_prints_the_array_script_and_first_trials(tmp_path, base, capsys):
    sweep = write_sweep(
        tmp_path,
        base,
        trials=6,
        parallel=2,
        space={"optim.lr": {"log_uniform": [1e-4, 1e-2]}, "optim.name": {"choice": ["adam", "adamw"]}},
    )
    assert main(["sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # the teardown is a run's: the one recovery entry point, given the sweep's directory
    assert "#SBATCH --array=0-1%2" in out and f"-m launcher.recovery {tmp_path / 'runs' / 'sw'} " in out
    assert "#   trial 0: optim.lr=" in out and "#   trial 3: " in out
    assert "dry run: nothing submitted" in out and not (tmp_path / "runs").exists()


def test_a_multi_node_base_job_makes_each_array_task_that_many_tasks(tmp_path, ring_shards, capsys):
    resources = {"cluster": "devcluster", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10}
    sweep = write_sweep(tmp_path, write_base(tmp_path, ring_shards, resources=resources), parallel=2)
    assert main(["sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in out and "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "problem" not in out


@pytest.mark.parametrize("where", [[], ["--local"]], ids=["slurm", "local"])
def test_a_sweep_checks_its_space_once_per_corner(tmp_path, base, validations, calls, capsys, where):
    """Four space keys (two ranges, choices of two and three): the base job is validated once, and the space once
    per corner (three: each end of each range and each choice stands in one), every key at once, not once per key
    and value (eleven); the manifest is loaded once; the model is built once for the preflight and once per corner
    for its model keys."""
    space = {"optim.lr": {"log_uniform": [1e-4, 1e-2]}, "optim.name": {"choice": ["adam", "adamw"]},
             "model.kwargs.norm": {"choice": ["bn", "gn", "ln"]}, "model.kwargs.drop_rate": {"uniform": [0.0, 0.5]}}
    sweep = write_sweep(tmp_path, base, trials=4, space=space)
    assert main(["sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), "--dry-run", *where]) == 0
    assert validations == ["JobSpec"] * (1 + 3)
    assert calls["manifest loaded"] == 1 and calls["model built"] == 1 + 3
    assert "dry run: nothing submitted" in capsys.readouterr().out


def test_a_bad_corner_still_names_its_key(tmp_path, base, capsys):
    """A corner that fails is checked key by key, so the error names the key and its value, as before."""
    space = {"optim.lr": {"log_uniform": [1e-4, 1e-2]}, "model.kwargs.norm": {"choice": ["bn", "foo"]}}
    sweep = write_sweep(tmp_path, base, space=space)
    assert main(["sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "space.model.kwargs.norm:" in err and "(value 'foo')" in err and "space.optim.lr" not in err


def test_a_dead_array_task_decides_for_its_trial_as_a_run_does(tmp_path, base, monkeypatch, capsys):
    """The sweep's teardown is a run's (``python -m launcher.recovery SWEEP``) and takes a run's decision for the
    trial its array task trained: an attempt that ended inside the job needs nothing; one that died after a rank
    noted a failure ends as lost in the trial's run, the trial FAIL and its parameters enqueued again."""
    from optuna.trial import TrialState

    from launcher import runs
    from launcher.recovery import main as recovery
    from launcher.sweep.spec import load_sweep
    from launcher.sweep.study import SweepDir, claim, create_study
    from launcher.sweep.study import write_sweep as write_sweep_dir

    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # no SLURM commands: its state is UNKNOWN, no requeue
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    spec, base_job = load_sweep(write_sweep(tmp_path, base))
    root = tmp_path / "runs" / "sw"
    write_sweep_dir(root, spec, base_job.spec.to_dict())
    study = create_study(root, spec)
    trial, _ = claim(root, study, spec, {"kind": "slurm", "job": "4242", "host": "h", "pid": 1, "worker": 0})
    run_dir = SweepDir(root).trial(trial.number)
    runs.add_job(run_dir, "4242", kind="slurm", state="RUNNING", restart_offset=0)

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    runs.record_start(run_dir, "4242", restart_count=0)
    runs.record_end(run_dir, "4242", state="REQUEUED", outcome="requeued")  # it checkpointed and requeued itself
    assert recovery([str(root), "--status", "1"]) == 0
    assert study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    runs.record_start(run_dir, "4242", restart_count=1)
    runs.record_failure(run_dir, "4242", 1, rank=0, exit=1, why="RuntimeError: boom")
    assert recovery([str(root), "--status", "1"]) == 0
    trials = study.get_trials(deepcopy=False)
    assert trials[trial.number].state == TrialState.FAIL
    assert [t.user_attrs.get("retry_of") for t in trials if t.state == TrialState.WAITING] == [trial.number]
    assert runs.read_jobs(run_dir)["jobs"][0]["attempts"][-1]["outcome"] == "lost"
    assert "marked FAIL, its parameters are enqueued again" in capsys.readouterr().out


def test_each_trial_of_a_multi_task_array_task_gets_its_own_master_port(monkeypatch):
    """The leader and its followers agree on a port per trial, so no trial's rendezvous meets the last one's."""
    import os

    from launcher.sweep import orders
    from lenstrain.parallel.distributed import MASTER_PORT_BASE, MASTER_PORT_SPAN, master_port_for_job

    monkeypatch.setattr(orders, "_FIRST_PORT", [])
    monkeypatch.setenv("SLURM_JOB_ID", "18144025")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    ports = []
    for trial in (0, 1, 2, 1):
        orders.use_trial_port(trial)
        ports.append(int(os.environ["MASTER_PORT"]))
    job_port = master_port_for_job("18144025")
    assert ports[:3] == [job_port + 1, job_port + 2, job_port + 3] and ports[3] == ports[1]
    monkeypatch.setattr(orders, "_FIRST_PORT", [])
    monkeypatch.setenv("MASTER_PORT", str(MASTER_PORT_BASE + MASTER_PORT_SPAN - 1))  # the user's, at the top
    orders.use_trial_port(0)
    assert int(os.environ["MASTER_PORT"]) == MASTER_PORT_BASE  # wrapped into the range
