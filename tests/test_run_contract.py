"""One run-directory contract: a job is validated once, at the edge, written once to ``config.yaml``, and
every task (SLURM or local, launcher or ``lenstrain train --nproc``) trains from that file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import main
from launcher.entry import TrainTask
from launcher.spec import JobSpec, load_job
from lenstrain.checkpointing.rundir import RunDir
from tests import counting
from tests.factories import launcher_job_dict, write_config
from tests.train_helpers import lenstrain

ROOT = Path(__file__).resolve().parents[1]
validations, calls = counting.validations, counting.calls  # fixtures


def test_a_submission_validates_the_job_once(launcher_job, tmp_path, validations, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    assert main(["submit", str(launcher_job("once")), "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    assert validations == ["JobSpec"]


@pytest.mark.parametrize("where", [[], ["--local", "--nproc", "1"]], ids=["slurm", "local"])
def test_a_submission_parses_loads_and_builds_once(launcher_job, tmp_path, calls, capsys, monkeypatch, where):
    """One parse of the job file, one load of its manifest, one model on the meta device: the preflight's, which
    the checkpoint-space estimate shares."""
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    assert main(["submit", str(launcher_job("once")), "--dry-run", "--runs-dir", str(tmp_path), *where]) == 0
    assert calls == {"job parsed": 1, "manifest loaded": 1, "model built": 1, "checkpoint size estimated": 1}
    assert "free space for checkpoints not checked" not in capsys.readouterr().out


def test_init_from_shapes_come_from_the_one_model(launcher_job, tmp_path, calls, capsys, monkeypatch, ring_shards):
    """``model.init_from``'s shapes are read off the preflight's model, not a second one built for them."""
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    source = tmp_path / "nothing-here"
    job = launcher_job("finetune", model={"name": "alternet_tiny", "init_from": str(source)})
    assert main(["submit", str(job), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "model.init_from" in capsys.readouterr().out  # checked (the weights are missing), as a warning
    assert calls["model built"] == 1 and calls["manifest loaded"] == 1


def test_the_task_carries_the_run_directory_not_the_config(tmp_path):
    task = pickle.loads(pickle.dumps(TrainTask(tmp_path, max_requeues=3, name="r")))
    assert vars(task) == {"run_dir": str(tmp_path), "max_requeues": 3, "name": "r", "restart_offset": 0,
                          "array_task": False}


def test_a_local_rank_trains_from_config_yaml(launcher_shards, tmp_path):
    run_dir = tmp_path / "r"
    spec, _ = load_job(launcher_job_dict(launcher_shards))  # job.yaml: 40 steps
    spec.name = "r"
    runs.write_run(run_dir, spec)
    run = RunDir(run_dir)
    assert yaml.safe_load(run.config.read_text()) == spec.training_dict()
    assert JobSpec.model_validate(yaml.safe_load(run.job.read_text())).training_dict() == spec.training_dict()

    config = yaml.safe_load(run.config.read_text())
    config["train"]["max_steps"] = 2  # only config.yaml says 2
    run.config.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "WORLD_SIZE": "1", "LENSTRAIN_JOB_ID": "local-1"}
    proc = subprocess.run([sys.executable, "-m", "launcher.entry", str(run_dir)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training complete at step 2" in proc.stdout


@pytest.mark.multiprocess
def test_lenstrain_train_writes_config_yaml_and_its_ranks_read_it(ring_shards, tmp_path):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 40})
    run_dir = tmp_path / "run"
    proc = lenstrain("train", config, "--run-dir", run_dir, "--nproc", "2", "--set", "train.max_steps=2",
                     "--set", "parallel.strategy=ddp", check=True)
    written = yaml.safe_load(RunDir(run_dir).config.read_text())
    assert written["train"]["max_steps"] == 2 and written["parallel"]["strategy"] == "ddp"
    assert "step 2/2" in proc.stdout
