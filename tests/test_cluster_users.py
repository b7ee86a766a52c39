"""What cluster users ask for (issue 21), through the real CLIs: job inheritance, site defaults (profile search
path, LENSTRAIN_CLUSTER, `launcher clusters`), the config reference and `launcher config`, `--seeds` with
`launcher report`, `--then` chained steps run locally, and the sweep checks that must exit 2.
The SLURM side (arrays, afterok, real sbatch options) is in tests/test_cluster_users_slurm.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.__main__ import main
from launcher.spec import read_job_yaml
from lenstrain.config.schema import ConfigError, load_config
from tests.factories import config_dict, launcher_job_dict

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    monkeypatch.delenv("LENSTRAIN_CLUSTER", raising=False)
    monkeypatch.delenv("LENSTRAIN_CLUSTERS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/lenstrain/clusters of the machine's user


# ------------------------------------------------------------------------------------ inheritance


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_base_is_a_deep_merge_relative_to_the_naming_file(tmp_path, ring_shards, monkeypatch):
    base = write(tmp_path / "jobs" / "common" / "base.yaml",
                 {"name": "base", **launcher_job_dict(ring_shards, model={"name": "alternet_tiny",
                                                                         "kwargs": {"norm": "gn", "drop_rate": 0.1}})})
    child = write(tmp_path / "jobs" / "child.yaml", "base: common/base.yaml\nmodel:\n  kwargs: {drop_rate: 0.3}\n"
                                                    "train: {max_steps: 7}\nresources: {time: '1:30:00'}\n")
    grandchild = write(tmp_path / "jobs" / "deeper" / "grandchild.yaml", "base: ../child.yaml\noptim: {lr: 0.01}\n")
    monkeypatch.chdir(tmp_path / "jobs" / "deeper")  # bases resolve against their files, not the directory

    data = read_job_yaml(grandchild)
    assert "base" not in data and "name" not in data  # a job's name is its own, never its base's
    assert data["model"] == {"name": "alternet_tiny", "kwargs": {"norm": "gn", "drop_rate": 0.3}}  # merged deeply
    assert data["train"] == {**launcher_job_dict(ring_shards)["train"], "max_steps": 7}
    assert data["optim"]["lr"] == 0.01 and data["optim"]["name"] == "adamw"
    assert data["resources"]["time"] == "1:30:00"  # the launcher's loader keeps a time a string
    assert data["resources"]["nodes"] == 2  # from the base
    # lenstrain reads the same chain
    cfg = load_config(grandchild)
    assert cfg.train.max_steps == 7 and cfg.model.kwargs == {"norm": "gn", "drop_rate": 0.3}
    assert base.is_file() and child.is_file()


def test_a_cycle_is_refused_naming_the_chain(tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "base: sub/b.yaml\nseed: 1\n")
    write(tmp_path / "sub" / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "base: ../a.yaml\n")
    code, _, err = run_cli(capsys, "submit", a, "--dry-run")
    assert code == 2
    assert "a cycle of job files: " in err
    assert f"{tmp_path}/a.yaml -> {tmp_path}/sub/b.yaml -> {tmp_path}/sub/c.yaml -> {tmp_path}/a.yaml" in err
    with pytest.raises(ConfigError, match="a cycle of job files"):
        load_config(a)
    write(tmp_path / "d.yaml", "base: missing.yaml\n")
    code, _, err = run_cli(capsys, "submit", tmp_path / "d.yaml", "--dry-run")
    assert code == 2 and f"base: {tmp_path}/missing.yaml: no such job file" in err
    write(tmp_path / "e.yaml", "base: [a.yaml]\n")
    assert run_cli(capsys, "config", tmp_path / "e.yaml")[0] == 2


def test_the_shipped_near_copies_inherit(capsys):
    """jobs/ keeps one copy of each protocol: the variants name a base and what differs."""
    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    children = [p for p in jobs if "base" in yaml.safe_load(p.read_text())]
    assert len(children) >= 10, children
    resnet34, resnet50 = read_job_yaml(ROOT / "jobs/resnet34_halo_mass.yaml"), read_job_yaml(
        ROOT / "jobs/resnet50_halo_mass.yaml")
    assert {k: v for k, v in resnet50.items() if k not in ("model", "name")} == {
        k: v for k, v in resnet34.items() if k not in ("model", "name")}
    assert resnet50["model"] == {"name": "resnet50"} and resnet50["name"] == "resnet50_halo_mass"
    # Every registered model has a ready job (the README says so).
    from lenstrain.models import list_models

    models = {read_job_yaml(p).get("model", {}).get("name") for p in jobs}
    assert set(list_models()) - models == set()
    # `launcher config` prints the resolved job with every default filled in.
    code, out, _ = run_cli(capsys, "config", ROOT / "jobs/resnet50_halo_mass.yaml", "--set", "resources.nodes=2")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["name"] == "resnet50_halo_mass" and resolved["resources"]["nodes"] == 2
    assert resolved["model"]["name"] == "resnet50" and resolved["optim"]["lr"] == 1e-3
    assert resolved["parallel"]["timeout_s"] == 600 and resolved["resources"]["sbatch"] == {}  # defaults too
    assert resolved["checkpoint"]["best_mode"] == "min"


# ------------------------------------------------------------------------------------ config reference


def test_the_config_reference_is_current_and_complete():
    from launcher.configref import REFERENCE, missing_descriptions, render

    assert missing_descriptions() == [], "give each key a description= or a line in lenstrain/config/docs.py"
    assert REFERENCE.read_text() == render(), (
        "launcher/docs/config.md is stale: run `python -m launcher.configref --write`")
    text = REFERENCE.read_text()
    for key in ("`resources.sbatch`", "`resources.gres`", "`model.init_from`", "`data.normalize`", "`base`",
                "`space.KEY.log_uniform`", "`preempt_signal`", "`train.max_steps`"):
        assert key in text, key


# ------------------------------------------------------------------------------------ site defaults


def test_profiles_search_path_default_cluster_and_the_clusters_command(tmp_path, monkeypatch, capsys,
                                                                         launcher_shards):
    site = tmp_path / "site"
    user = tmp_path / "home" / ".config" / "lenstrain" / "clusters"
    write(site / "hpc.yaml", {"kind": "slurm", "partition": "batch", "gpus_per_node": 4, "max_nodes": 8,
                              "sbatch": {"gres-flags": "enforce-binding"}})
    write(user / "hpc.yaml", {"kind": "slurm", "partition": "mine"})  # shadowed by the site's
    write(user / "laptop.yaml", {"kind": "local"})
    monkeypatch.setenv("LENSTRAIN_CLUSTERS_DIR", str(site))
    monkeypatch.setenv("LENSTRAIN_CLUSTER", "hpc")

    code, out, err = run_cli(capsys, "clusters")
    assert code == 0, err
    lines = out.splitlines()
    hpc = next(line for line in lines if " hpc " in line)
    assert hpc.startswith("* hpc") and str(site / "hpc.yaml") in hpc and "4 GPU(s)/node" in hpc
    assert any(str(user / "hpc.yaml") in line and "(shadowed)" in line for line in lines)
    assert any(line.startswith("  laptop") and str(user / "laptop.yaml") in line for line in lines)
    assert any(line.startswith("  devcluster") and "slurm/clusters/devcluster.yaml" in line for line in lines)

    # A job without resources.cluster takes $LENSTRAIN_CLUSTER; the profile's sbatch options reach the script.
    job = launcher_job_dict(launcher_shards)
    del job["resources"]["cluster"]
    path = write(tmp_path / "job.yaml", job)
    code, out, err = run_cli(capsys, "submit", path, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    assert "cluster: hpc" in out and "#SBATCH --partition=batch" in out and "#SBATCH --gres-flags=enforce-binding" in out
    monkeypatch.setenv("LENSTRAIN_CLUSTER", "nosuch")
    code, _, err = run_cli(capsys, "submit", path, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "resources.cluster: unknown cluster profile 'nosuch'; valid choices: devcluster" in err


def test_profile_sbatch_options_are_checked(tmp_path, monkeypatch, capsys, launcher_job):
    write(tmp_path / "site" / "bad.yaml", {"kind": "slurm", "sbatch": {"requeue": True}})
    monkeypatch.setenv("LENSTRAIN_CLUSTERS_DIR", str(tmp_path / "site"))
    code, _, err = run_cli(capsys, "submit", launcher_job(), "--set", "resources.cluster=bad", "--dry-run")
    assert code == 2 and "invalid cluster profile" in err and "'requeue' is set by the launcher" in err


# ------------------------------------------------------------------------------------ sweeps


def test_sweep_checks_that_exit_2(tmp_path, capsys, launcher_job):
    base = launcher_job("b")
    sweep = write(tmp_path / "s.yaml", {"base": str(base), "trials": 2, "direction": "maximize", "metric": "val/r22",
                                        "space": {"optim.lr": {"log_uniform": [1e-4, 1e-2]}}})
    code, _, err = run_cli(capsys, "sweep", sweep, "--dry-run", "--local")
    assert code == 2 and "metric: 'val/r22' is not a metric validation measures; valid choices: val/loss" in err
    sweep = write(tmp_path / "s2.yaml", {"base": str(base), "trials": 2, "metric": "val/r2",
                                         "space": {"model.kwargs.norm": {"choice": ["bn", "foo"]}}})
    code, _, err = run_cli(capsys, "sweep", sweep, "--dry-run", "--local")
    assert code == 2 and "space.model.kwargs.norm: alternet_tiny: Unknown norm 'foo'" in err and "(value 'foo')" in err
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(sweep), "--nproc", "2"])
    assert exit_.value.code == 2 and "unrecognized arguments: --nproc 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ seeds and steps here


@pytest.mark.slow
def test_seeds_run_in_turn_then_report_mean_and_std(tmp_path, capsys, ring_shards):
    job = write(tmp_path / "j.yaml", {**config_dict(ring_shards, train={"max_steps": 6, "precision": "fp32",
                                                                         "val_every_steps": 3},
                                                    checkpoint={"every_steps": 3, "best_metric": "val/r2"}),
                                      "resources": {"cluster": "local"}})
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "submit", job, "--seeds", "0,1,2", "--name", "ms", "--dry-run",
                             "--runs-dir", runs_dir)
    assert code == 0, err
    assert "# 3 seed(s): ms-s0 (seed 0, new run), ms-s1 (seed 1, new run), ms-s2 (seed 2, new run)" in out
    code, out, err = run_cli(capsys, "submit", job, "--seeds", "0-2", "--name", "ms", "--local", "--runs-dir", runs_dir,
                             "--then", "eval")
    assert code == 0, out + err
    for seed in range(3):
        run_dir = runs_dir / f"ms-s{seed}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == seed
        assert (run_dir / "eval" / "test" / "metrics.json").is_file()  # --then eval ran after each
    code, out, err = run_cli(capsys, "report", "ms", "--runs-dir", runs_dir)
    assert code == 0, err
    print(out)
    assert "ms: test split, best checkpoint of each of 3 seed(s) (0, 1, 2)" in out
    r2 = next(line for line in out.splitlines() if "test/r2" in line)
    assert " ± " in r2 and "(seeds: " in r2
    rows = list(csv.reader((runs_dir / "ms-seeds-test.csv").open()))
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "mean", "std"]
    values = [float(r[rows[0].index("r2")]) for r in rows[1:4]]
    mean, std = float(rows[4][rows[0].index("r2")]), float(rows[5][rows[0].index("r2")])
    assert mean == pytest.approx(sum(values) / 3, rel=1e-6)
    assert std == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5, rel=1e-5)
    assert len(set(values)) == 3  # three seeds, three different models
    code, _, err = run_cli(capsys, "report", "nosuch", "--runs-dir", runs_dir)
    assert code == 2 and "no runs nosuch-s0" in err and "seed groups there: ms" in err


@pytest.mark.slow
def test_then_eval_export_runs_here_after_training_and_status_shows_it(tmp_path, capsys, ring_shards):
    job = write(tmp_path / "j.yaml", {**config_dict(ring_shards, train={"max_steps": 4, "precision": "fp32"}),
                                      "resources": {"cluster": "local"}})
    runs_dir = tmp_path / "runs"
    code, out, err = run_cli(capsys, "submit", job, "--local", "--name", "chain", "--then", "eval,export",
                             "--runs-dir", runs_dir)
    assert code == 0, out + err
    run_dir = runs_dir / "chain"
    assert json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())["split"] == "test"
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "export" / "model.json").is_file()
    jobs = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    assert [j.get("steps") for j in jobs] == [None, "eval,export"] and jobs[1]["state"] == "COMPLETED"
    code, out, _ = run_cli(capsys, "status", "--runs-dir", runs_dir)
    row = next(line for line in out.splitlines() if "chain" in line)
    assert "COMPLETED" in row and "eval,export COMPLETED" in row
    code, _, err = run_cli(capsys, "submit", job, "--local", "--then", "eval,deploy", "--runs-dir", runs_dir)
    assert code == 2 and "--then 'eval,deploy': unknown step(s) deploy; valid: eval, export" in err


# ------------------------------------------------------------------------------------ install


def test_run_help_exits_0_and_setup_needs_no_sudo_when_gfortran_is_there(tmp_path):
    proc = subprocess.run([str(ROOT / "run"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "./run test" in proc.stdout
    assert subprocess.run([str(ROOT / "run"), "nope"], capture_output=True, text=True).returncode == 2
    # Not root, and a sudo that would fail: with gfortran on PATH, setup asks for neither apt nor sudo.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")
    (fake / "sudo").write_text(f"#!/bin/sh\necho sudo \"$@\" >> {tmp_path}/sudo.log\nexit 1\n")
    (fake / "gfortran").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(ROOT / "run"), "setup"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "sudo.log").exists() and "apt" not in proc.stdout


def test_a_resnet18_ddp_run_imports_neither_escnn_nor_deepspeed(tmp_path, ring_shards):
    """Two real DDP ranks (gloo) train resnet18 and report the heavy modules they imported: none."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, sys\n"
        "from lenstrain.config.schema import load_config\n"
        "from lenstrain.run.train import run_training\n"
        "cfg = load_config(sys.argv[1])\n"
        "code = run_training(cfg, sys.argv[2])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'escnn', 'deepspeed'})\n"
        "print('HEAVY', json.dumps({'code': code, 'heavy': heavy}), flush=True)\n")
    config = write(tmp_path / "c.yaml", config_dict(ring_shards, model={"name": "resnet18"},
                                                    parallel={"strategy": "ddp"}, train={"max_steps": 2}))
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29000 + os.getpid() % 1000),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(config), str(tmp_path / "run")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    reports = [json.loads(line.split(" ", 1)[1]) for out in outs for line in out.splitlines()
               if line.startswith("HEAVY ")]
    assert len(reports) == 2, outs
    assert reports == [{"code": 0, "heavy": []}] * 2, outs
    # ... while building an escnn model imports it, and only then.
    probe = ("import sys; from lenstrain.models import list_models, create_model; list_models(); "
             "a = 'escnn' in sys.modules; create_model('escnn_c8', image_size=32); print(a, 'escnn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["False", "True"], out.stderr
