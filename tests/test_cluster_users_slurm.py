"""Issue 21 on the real devcluster: site sbatch options reach SLURM as asked; `submit --seeds` is one job array
whose tasks train one seed each, with `--then eval,export` chained per seed (afterok); `launcher report` gives
mean ± std over the seeds; and every long option real sbatch documents is one `resources.sbatch` accepts."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import main
from launcher.sbatch_options import LAUNCHER_OWNED, SBATCH_LONG_OPTIONS, TYPED_FIELDS
from tests.factories import config_dict
from tests.slurm_helpers import sacct_state, scontrol_job, wait_for

pytestmark = pytest.mark.slurm

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def small_job(path: Path, shards: Path, steps: int = 12) -> Path:
    job = {"resources": {"cluster": "devcluster", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10,
                         "signal_delay_s": 30},
           **config_dict(shards, train={"max_steps": steps, "precision": "fp32", "val_every_steps": steps // 2},
                         checkpoint={"every_steps": steps // 2, "best_metric": "val/r2"})}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_every_documented_sbatch_long_option_is_known(slurm_cluster):
    text = "".join(subprocess.run(["sbatch", flag], capture_output=True, text=True, timeout=30,
                                  env=slurm_cluster.env()).stdout for flag in ("--help", "--usage"))
    real = set(re.findall(r"--([a-z][a-z0-9-]+)", text))
    assert len(real) > 60, text
    assert sorted(real - SBATCH_LONG_OPTIONS) == []
    assert set(LAUNCHER_OWNED) | set(TYPED_FIELDS) <= SBATCH_LONG_OPTIONS


def test_site_options_reach_slurm(slurm_cluster, ring_shards, tmp_path, capsys):
    job = small_job(tmp_path / "site.yaml", ring_shards, steps=4)
    code, out = cli(capsys, "submit", job, "--runs-dir", tmp_path / "runs", "--name", "site",
                    "--set", "resources.comment=issue-21-site-options", "--set", "resources.mail_type=END,FAIL",
                    "--set", "resources.mail_user=me@example.org", "--set", "resources.nodelist=n1",
                    "--set", "resources.exclude=n2", "--set", "resources.exclusive=true",
                    "--set", "resources.sbatch={nice: 7, hold: false}")  # false: left out (a held job never runs)
    assert code == 0, out
    job_id = runs.read_jobs(tmp_path / "runs" / "site")["jobs"][-1]["job_id"]
    info = scontrol_job(job_id)
    assert info["Comment"] == "issue-21-site-options"
    assert info["Nice"] == "7" and info["MailType"] in ("END,FAIL", "FAIL,END") and info["MailUser"] == "me@example.org"
    assert info["ReqNodeList"] == "n1" and info["ExcNodeList"] == "n2" and info["OverSubscribe"] == "NO"
    wait_for(lambda: sacct_state(job_id) in FINAL, 240, what=f"job {job_id} to end")
    assert sacct_state(job_id) == "COMPLETED"


def test_seeds_are_one_array_with_chained_steps_and_a_report(slurm_cluster, ring_shards, tmp_path, capsys):
    job = small_job(tmp_path / "seeds.yaml", ring_shards)
    runs_dir = tmp_path / "runs"
    code, out = cli(capsys, "submit", job, "--seeds", "0,1,2", "--name", "ms", "--then", "eval,export",
                    "--runs-dir", runs_dir, "--dry-run")
    assert code == 0 and "#SBATCH --array=0-2%3" in out and "run_dirs=(" in out and "# then: eval, export" in out
    code, out = cli(capsys, "submit", job, "--seeds", "0,1,2", "--name", "ms", "--then", "eval,export",
                    "--runs-dir", runs_dir)
    assert code == 0, out
    records = [runs.read_jobs(runs_dir / f"ms-s{s}")["jobs"] for s in range(3)]
    train_ids = [jobs[0]["job_id"] for jobs in records]
    array = train_ids[0].split("_")[0]
    assert train_ids == [f"{array}_{s}" for s in range(3)]  # ONE array, task i trains seed i
    step_ids = [jobs[1]["job_id"] for jobs in records]
    assert [jobs[1]["after"] for jobs in records] == train_ids
    for step_id, train_id in zip(step_ids, train_ids, strict=True):
        assert scontrol_job(step_id).get("Dependency", "").startswith(f"afterok:{train_id}") or \
            sacct_state(step_id) in FINAL | {"RUNNING", "PENDING"}

    def all_done():
        return all(sacct_state(j) in FINAL for j in step_ids)

    wait_for(all_done, 600, interval=1, what="the seeds' training and chained steps")
    assert [sacct_state(j) for j in train_ids] == ["COMPLETED"] * 3
    assert [sacct_state(j) for j in step_ids] == ["COMPLETED"] * 3
    for s in range(3):
        run_dir = runs_dir / f"ms-s{s}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == s
        assert (run_dir / "eval" / "test" / "metrics.json").is_file() and (run_dir / "export" / "model.safetensors").is_file()
    code, out = cli(capsys, "status", "--runs-dir", runs_dir)
    for s in range(3):
        row = next(line for line in out.splitlines() if f"ms-s{s}" in line)
        assert "COMPLETED" in row and train_ids[s] in row and "eval,export COMPLETED" in row, row
    code, out = cli(capsys, "logs", "ms-s1", "--runs-dir", runs_dir)  # every seed's log sits in the array's folder
    assert code == 0 and "training complete at step 12" in out

    code, out = cli(capsys, "report", "ms", "--runs-dir", runs_dir)
    assert code == 0, out
    assert "ms: test split, best checkpoint of each of 3 seed(s) (0, 1, 2)" in out
    assert re.search(r"test/r2 +-?\d\.\d{4} ± \d\.\d{4}", out), out
    rows = list(csv.reader((runs_dir / "ms-seeds-test.csv").open()))
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "mean", "std"]
    (tmp_path / "report.txt").write_text(out)
    metrics = json.loads((runs_dir / "ms-s0" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["step"] in (6, 12)
