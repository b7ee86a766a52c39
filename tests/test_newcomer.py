"""A newcomer's first hour: a dry run before any data exists, the README's local smoke test of the
flagship job on a small machine, a quiet setup, and a requeue count that spans a run's resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import main
from launcher.entry import TrainTask
from tests.factories import launcher_job_dict

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "jobs" / "alternet_large.yaml"


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------- dry run


def test_dry_run_before_the_shard_set_exists_prints_the_script_and_warns(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: data/shards/halo_mass does not exist yet
    code, out, err = run_cli(capsys, "submit", FLAGSHIP, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    script = out.index("#!/bin/bash")
    warning = out.index("# warning: submitting this job would stop at 1 problem(s):")
    assert "name: alternet_large" in out[:script] and "srun" in out[script:warning]
    assert f"#   data.shards: {tmp_path}/data/shards/halo_mass is not a shard set (no manifest.json)" in out[warning:]
    assert out.rstrip().endswith("# dry run: nothing submitted")
    assert not (tmp_path / "runs").exists()

    # Without --dry-run the same problem stops the submission.
    code, _, err = run_cli(capsys, "submit", FLAGSHIP, "--runs-dir", tmp_path / "runs")
    assert code == 2 and "data.shards: " in err and "is not a shard set" in err


def test_dry_run_still_refuses_a_job_that_is_not_valid(capsys, tmp_path):
    code, out, err = run_cli(capsys, "submit", FLAGSHIP, "--dry-run", "--set", "optim.lrr=1")
    assert code == 2 and "optim.lrr: unknown key" in err and "#!/bin/bash" not in out


# ------------------------------------------------------------------------------ --local on a laptop


def flagship_smoke(shards: Path) -> list[str]:
    """The README's local smoke test of the flagship, on the small ring set (84 training samples)."""
    return ["submit", str(FLAGSHIP), "--local", "--set", "model.name=alternet_tiny", "--set", f"data.shards={shards}",
            "--set", "data.batch_size=8", "--dry-run"]


def test_preflight_counts_the_local_ranks(capsys, launcher_shards, tmp_path):
    # 2 local ranks of 8 need 16 samples per step; on SLURM 16 ranks need 128, more than the set has.
    code, out, _ = run_cli(capsys, *flagship_smoke(launcher_shards), "--nproc", "2", "--runs-dir", tmp_path)
    assert code == 0 and "# local run: 2 process(es)" in out
    assert "warning" not in out, out
    code, out, _ = run_cli(capsys, *[a for a in flagship_smoke(launcher_shards) if a != "--local"],
                           "--runs-dir", tmp_path)
    assert code == 0 and "data.batch_size: a global batch of 128 samples (8 x 16 rank(s)" in out


def test_local_caps_data_workers_and_says_so_once(capsys, launcher_shards, tmp_path):
    code, out, _ = run_cli(capsys, *flagship_smoke(launcher_shards), "--nproc", "2", "--runs-dir", tmp_path)
    cap = (os.cpu_count() or 1) // 2
    assert code == 0
    note = f"data.workers 8 -> {cap}: this machine has {os.cpu_count()} CPU(s) for 2 local process(es)"
    assert out.count("data.workers 8 -> ") == 1 and note in out
    resolved = yaml.safe_load(out[out.index("\n") + 1 : out.index("\n# ")])
    assert resolved["data"]["workers"] == cap

    # A job that asks for no more than the machine has is left as it is, silently.
    code, out, _ = run_cli(capsys, *flagship_smoke(launcher_shards), "--nproc", "2", "--set", "data.workers=0",
                           "--runs-dir", tmp_path)
    assert code == 0 and "# data.workers" not in out


# ------------------------------------------------------------------------------------ requeues


@pytest.mark.slow  # several training processes, a run resumed again and again
def test_max_requeues_counts_across_the_runs_resumes(capsys, launcher_shards, tmp_path):
    from launcher.spec import load_job

    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "r"
    spec, _ = load_job(launcher_job_dict(launcher_shards))  # resources.max_requeues: 3
    spec.name = "r"
    runs.write_run(run_dir, spec)
    runs.add_job(run_dir, "100", kind="slurm")
    runs.set_requeues(run_dir, "100", 2)  # requeued twice, then cancelled ...
    runs.add_job(run_dir, "200", kind="slurm")  # ... and resumed: its own first requeue is the run's third
    runs.record_start(run_dir, "200", restart_count=1)
    runs.set_states(run_dir, {"200": "STOPPED"})

    code, out, _ = run_cli(capsys, "status", "--runs-dir", runs_dir)
    row = next(line for line in out.splitlines() if " r " in line)
    assert code == 0 and " 3/3 " in row

    # A job that has itself been requeued once only is still not requeued: the run's limit is reached.
    task = TrainTask(run_dir, max_requeues=spec.resources.max_requeues, name="r")
    assert task._requeue("200", restart=1) == ("requeue-limit", "STOPPED")


# ------------------------------------------------------------------------------------------ ./run


FAKE_PYTHON = """#!/bin/sh
[ "$1" = --version ] && { echo "Python 3.11.0"; exit 0; }
echo "Collecting lenstrain"
echo "WARNING: a dependency is noisy" >&2
exit ${FAKE_PIP_STATUS:-0}
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The run script and pyproject.toml in a directory whose .venv holds a python that only pretends to pip."""
    root = tmp_path / "clone"
    root.mkdir()
    shutil.copy2(ROOT / "run", root / "run")
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def test_setup_prints_a_summary_and_keeps_pips_output_in_the_log(checkout):
    if shutil.which("dpkg") is None or subprocess.run(["dpkg", "-s", "gfortran"], capture_output=True).returncode:
        pytest.fail("gfortran is not installed: run ./run setup once first")
    proc = subprocess.run(["./run", "setup"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr and "Collecting" not in proc.stdout
    assert proc.stdout.splitlines()[-1] == (
        "==> setup: .venv ready, Python 3.11.0, lenstrain installed (2 pip warning line(s) in the log); "
        "full log: .venv/setup.log")
    log = (checkout / ".venv" / "setup.log").read_text()
    assert log.count("WARNING: a dependency is noisy") == 2 and "pip install -e .[dev]" in log

    again = subprocess.run(["./run", "setup"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert again.stdout == "==> setup: .venv ready, Python 3.11.0, lenstrain up to date; full log: .venv/setup.log\n"


def test_a_failed_install_shows_the_end_of_the_log(checkout):
    env = {**os.environ, "FAKE_PIP_STATUS": "1"}
    proc = subprocess.run(["./run", "setup"], cwd=checkout, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "error: upgrade pip failed; the last lines of" in proc.stderr
    assert "WARNING: a dependency is noisy" in proc.stderr
    assert not (checkout / ".venv" / ".lenstrain-installed").exists()  # the next setup tries again
