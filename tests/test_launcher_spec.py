"""Job validation, --dry-run and the run directory, without SLURM: bad jobs exit 2 naming their dotted
path and submit nothing; the sbatch script matches a golden file; every job in jobs/ validates."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import COMMANDS, main
from launcher.spec import JobSpec, load_job, parse_time_minutes
from tests.factories import launcher_job_dict

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def no_submission(monkeypatch):
    """No SLURM reachable, and a submission would fail the test."""
    import launcher.slurm

    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(launcher.slurm, "submit", refuse)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------- bad jobs

BAD_SETS = [
    (["resources.nodse=2"], "resources.nodse: unknown key; valid keys: cluster, nodes, gpus_per_node"),
    (["resources.nodes=two"], "resources.nodes: Input should be a valid integer"),
    (["resources.nodes=3"], "resources.nodes: 3 nodes requested; cluster 'devcluster' allows at most 2"),
    (["resources.gpus_per_node=1"], "resources.gpus_per_node: 1 GPUs per node requested; cluster 'devcluster' has no GPUs"),
    (["resources.cpus_per_task=3"], "resources.cpus_per_task: 1 tasks x 3 CPUs = 3 CPUs per node; cluster 'devcluster' has 2"),
    (["resources.tasks_per_node=3", "resources.cpus_per_task=null"], "resources.tasks_per_node: 3 tasks x 1 CPUs"),
    (["resources.mem=64G"], "resources.mem: 64G per node requested"),
    (["resources.mem=lots"], "resources.mem: 'lots' is not a memory size"),
    (["resources.time=soon"], "resources.time: 'soon' is not a time; expected minutes (e.g. 90) or HH:MM:SS"),
    (["resources.time=0"], "resources.time: must be at least 1 minute"),
    (["resources.signal_delay_s=900"], "resources.signal_delay_s: 900 s is not shorter than the time limit"),
    (["resources.cluster=moon"], "resources.cluster: unknown cluster profile 'moon'; valid choices: devcluster"),
    (["resources.cluster=example-gpu", "resources.gpus_per_node=4", "resources.tasks_per_node=2"],
     "resources.tasks_per_node: 2 tasks per node with 4 GPUs per node"),
    (["resources.cluster=example-gpu", "resources.gpus_per_node=8"],
     "resources.gpus_per_node: 8 GPUs per node requested; cluster 'example-gpu' has 4 GPUs per node"),
    (["data.shards=/nonexistent/shards"], "data.shards: /nonexistent/shards is not a shard set (no manifest.json)"),
    (["optim.lrr=3e-4"], "optim.lrr: unknown key; valid keys: name, lr"),
    (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["model.name=alternet_huge"], "model.name: unknown model 'alternet_huge'; valid choices:"),
    (["parallel.strategy=single"], "parallel.strategy: 'single' runs one process, but 2 ranks would run"),
    (["parallel.backend=nccl"], "parallel.backend: nccl needs GPUs"),
    (["resourcez.nodes=1"], "resourcez: unknown key; valid keys: seed, data, model"),
    (["name=bad name!"], "name: 'bad name!': use letters, digits"),
    (["resources.nodes"], "--set 'resources.nodes': expected KEY=VALUE"),
    # Site SLURM options: typed fields and resources.sbatch, checked before anything is written.
    (["resources.sbatch={gres-flag: enforce-binding}"],
     "resources.sbatch: 'gres-flag' is not an sbatch option; did you mean gres-flags"),
    (["resources.sbatch={signal: 'USR1@60'}"], "resources.sbatch: 'signal' is set by the launcher: the launcher sends"),
    (["resources.sbatch={array: 0-3}"], "'array' is set by the launcher: the launcher builds job arrays itself"),
    (["resources.sbatch={output: x.log}"], "'output' is set by the launcher"),
    (["resources.sbatch={requeue: true}"], "'requeue' is set by the launcher"),
    (["resources.sbatch={error: x.err}"], "'error' is set by the launcher"),
    (["resources.sbatch={partition: gpu}"], "'partition' has its own key: set resources.partition"),
    (["resources.sbatch={nice: [1]}"], "resources.sbatch"),
    (["resources.comment=\"a\\nb\""], "resources.comment: 'a\\nb': a comment must be one line without control"),
    (["resources.mail_type=END,SOMETIMES"], "resources.mail_type: unknown mail type 'SOMETIMES'; valid choices"),
    (["resources.mail_user=nobody"], "resources.mail_user: 'nobody' is not a mail address"),
    (["resources.exclude=n1;rm"], "resources.exclude: 'n1;rm' is not a SLURM node list"),
    (["resources.gres=gpu:a100:2"], "resources.gres: 'gpu:a100:2' asks for 2 GPU(s) per node but resources.gpus_per_node is 0"),
    (["resources.exclusive=always"], "resources.exclusive"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_SETS, ids=[s[0][-1] for s in BAD_SETS])
def test_bad_set_exits_2_with_dotted_path(capsys, launcher_job, tmp_path, overrides, expected):
    job = launcher_job()
    sets = [x for o in overrides for x in ("--set", o)]
    code, out, err = run_cli(capsys, "submit", job, "--runs-dir", tmp_path / "runs", *sets)
    assert code == 2, (out, err)
    assert expected in err, err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


def test_bad_job_file_reports_every_problem(capsys, launcher_shards, tmp_path):
    job = copy.deepcopy(launcher_job_dict(launcher_shards))
    job["resources"]["nodse"] = 2
    job["resources"]["time"] = [1]
    job["train"]["max_step"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    code, _, err = run_cli(capsys, "submit", path, "--runs-dir", tmp_path / "runs")
    assert code == 2
    for where in ("resources.nodse: unknown key", "resources.time", "train.max_step: unknown key; valid keys: max_steps"):
        assert where in err, err


def test_missing_or_broken_files_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "submit", tmp_path / "nope.yaml")
    assert code == 2 and "no such config file" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli(capsys, "submit", tmp_path / "list.yaml")
    assert code == 2 and "must be a mapping" in err


def test_resources_defaults_and_time_formats(launcher_shards, tmp_path):
    spec, profile = load_job(launcher_job_dict(launcher_shards, resources={"tasks_per_node": None}))
    assert spec.resources.ntasks_per_node == 1 and spec.resources.world_size == 2
    assert profile.name == "devcluster" and profile.partition == "debug"
    gpu, _ = load_job(launcher_job_dict(launcher_shards, resources={
        "cluster": "example-gpu", "gpus_per_node": 4, "tasks_per_node": None, "cpus_per_task": 8}))
    assert gpu.resources.ntasks_per_node == 4 and gpu.resources.world_size == 8

    assert parse_time_minutes(90) == 90
    assert parse_time_minutes("01:30:00") == 90
    assert parse_time_minutes("1:30:30") == 91  # seconds round up: SLURM limits are minutes
    assert parse_time_minutes("2-00:00:00") == 2880
    # YAML 1.1 would read 1:30:00 as the integer 5400; a job file means an hour and a half.
    path = tmp_path / "t.yaml"
    job = launcher_job_dict(launcher_shards)
    path.write_text(yaml.safe_dump(job).replace("time: 10", "time: 1:30:00"))
    assert load_job(path)[0].resources.time_minutes == 90
    assert load_job(path, ["resources.time=2:00:00"])[0].resources.time_minutes == 120
    assert load_job(path, ["resources.time=45"])[0].resources.time_minutes == 45


def test_relative_shards_resolve_against_the_current_directory(launcher_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(launcher_shards.parent)
    spec, _ = load_job(launcher_job_dict(launcher_shards, data={"shards": launcher_shards.name}))
    assert Path(spec.data.shards) == launcher_shards.resolve()


# ------------------------------------------------------------------------------------ dry run


def normalise(text: str, run_dir: Path) -> str:
    return text.replace(str(run_dir), "<RUN>").replace(shlex.quote(sys.executable), "<PYTHON>")


def sbatch_part(out: str) -> str:
    start = out.index("#!/bin/bash")
    end = out.index("# dry run: nothing submitted")
    return out[start:end].rstrip() + "\n"


GOLDEN_CASES = {
    "devcluster": ([], "launcher_sbatch_devcluster.sh"),
    "example-gpu": (["resources.cluster=example-gpu", "resources.nodes=4", "resources.gpus_per_node=4",
                     "resources.tasks_per_node=null", "resources.cpus_per_task=16", "resources.mem=400G",
                     "resources.time=12:00:00", "resources.constraint=a100", "resources.qos=high",
                     "resources.signal_delay_s=180", "resources.max_requeues=20",
                     "resources.setup=[export OMP_NUM_THREADS=16]", "parallel.backend=nccl"],
                    "launcher_sbatch_example_gpu.sh"),
    # Every site option, typed and passed through: each must show as its own #SBATCH line.
    "site-options": (["resources.cluster=example-gpu", "resources.nodes=2", "resources.gpus_per_node=4",
                      "resources.tasks_per_node=null", "resources.cpus_per_task=16", "resources.gres=gpu:a100:4",
                      "resources.exclusive=true", "resources.exclude=gpu[01-02]", "resources.nodelist=gpu[10-11]",
                      "resources.reservation=maint_0412", "resources.mail_type=end,fail",
                      "resources.mail_user=me@example.org", "resources.comment=halo mass, seed 0",
                      "resources.sbatch={gres-flags: enforce-binding, nice: 10, hint: nomultithread, "
                      "spread-job: true, begin: false}", "parallel.backend=nccl"],
                     "launcher_sbatch_site_options.sh"),
}

SITE_LINES = ["#SBATCH --gres=gpu:a100:4", "#SBATCH --exclusive", "#SBATCH --exclude='gpu[01-02]'",
              "#SBATCH --nodelist='gpu[10-11]'", "#SBATCH --reservation=maint_0412", "#SBATCH --mail-type=END,FAIL",
              "#SBATCH --mail-user=me@example.org", "#SBATCH --comment='halo mass, seed 0'",
              "#SBATCH --gres-flags=enforce-binding", "#SBATCH --nice=10", "#SBATCH --hint=nomultithread",
              "#SBATCH --spread-job"]


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_dry_run_sbatch_script_matches_golden(capsys, launcher_job, tmp_path, case):
    overrides, golden_name = GOLDEN_CASES[case]
    run_dir = tmp_path / "runs" / "golden"
    sets = [x for o in overrides for x in ("--set", o)]
    code, out, err = run_cli(capsys, "submit", launcher_job("golden"), "--run-dir", run_dir, "--dry-run", *sets)
    assert code == 0, err
    script = normalise(sbatch_part(out), run_dir)
    golden = GOLDEN / golden_name
    if os.environ.get("LENSTRAIN_UPDATE_GOLDEN") or not golden.exists():
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text()
    assert not run_dir.exists()  # a dry run writes nothing
    if case == "site-options":
        lines = script.splitlines()
        assert [line for line in SITE_LINES if line not in lines] == []
        assert "--gpus-per-node" not in script and "--begin" not in script  # gres asks; false leaves an option out

    # The resolved job it prints is complete and valid on its own.
    resolved = yaml.safe_load(out[out.index("\n") + 1 : out.index("#!/bin/bash")].split("\n# sbatch")[0])
    spec = JobSpec.model_validate(resolved)
    assert spec.name == "golden"
    assert Path(spec.data.shards).is_absolute()


def test_dry_run_local_prints_the_local_plan(capsys, launcher_job, tmp_path):
    code, out, err = run_cli(capsys, "submit", launcher_job(), "--runs-dir", tmp_path / "runs", "--dry-run",
                             "--local", "--nproc", "2")
    assert code == 0, err
    assert "# local run: 2 process(es) of `python -m launcher.entry" in out
    assert "#!/bin/bash" not in out


def test_checks_that_cannot_run_say_so_in_one_line(capsys, launcher_job, tmp_path):
    """escnn's layers cannot be built on the meta device: the model build check and the checkpoint-size
    estimate cannot run, and each says so with the reason instead of passing in silence."""
    code, out, err = run_cli(capsys, "submit", launcher_job(model={"name": "escnn_c8"}), "--runs-dir",
                             tmp_path / "runs", "--dry-run", "--local", "--nproc", "1")
    assert code == 0, err
    [kwargs_note] = [line for line in err.splitlines() if "model.kwargs not checked" in line]
    assert "escnn_c8" in kwargs_note and "NotImplementedError" in kwargs_note
    [space_note] = [line for line in out.splitlines() if "free space for checkpoints not checked" in line]
    assert "escnn_c8" in space_note and "NotImplementedError" in space_note


# ------------------------------------------------------------------------------ no SLURM here


def test_without_slurm_it_says_so_and_suggests_local(capsys, launcher_job, tmp_path):
    code, out, err = run_cli(capsys, "submit", launcher_job("nocluster"), "--runs-dir", tmp_path / "runs")
    assert code == 2
    assert "no SLURM cluster reachable" in err
    assert "--local" in err and 'eval "$(slurm/devcluster env)"' in err


# ---------------------------------------------------------------------------- run directories


def test_run_dir_resubmit_and_conflict(capsys, launcher_shards, launcher_job, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    spec, _ = load_job(launcher_job_dict(launcher_shards))
    spec.name = "r"
    assert runs.check_run(run_dir, spec) == "new"
    runs.write_run(run_dir, spec)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 40
    assert yaml.safe_load((run_dir / "job.yaml").read_text())["resources"]["nodes"] == 2

    job = launcher_job("r")
    code, out, _ = run_cli(capsys, "submit", job, "--run-dir", run_dir, "--dry-run")
    assert code == 0 and "(resubmit run)" in out
    # Resources may change on a resubmit (more time, other nodes); training may not.
    code, out, _ = run_cli(capsys, "submit", job, "--run-dir", run_dir, "--dry-run", "--set", "resources.time=20")
    assert code == 0 and "(resubmit run)" in out
    code, _, err = run_cli(capsys, "submit", job, "--run-dir", run_dir, "--dry-run", "--set", "optim.lr=0.01")
    assert code == 2
    assert "holds a different run (optim.lr: 0.001 -> 0.01)" in err
    assert "--name" in err and "python -m launcher resume r" in err

    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "submit", job, "--runs-dir", tmp_path / "runs", "--name", "other", "--dry-run")
    assert code == 2 and "is not a run directory" in err


def test_jobs_json_updates_are_merged(tmp_path):
    runs.add_job(tmp_path, "101", kind="slurm")
    runs.record_start(tmp_path, "101", restart_count=0, nodes="n[1-2]")
    runs.record_end(tmp_path, "101", state="REQUEUED", outcome="requeued", step=7)
    runs.record_start(tmp_path, "101", restart_count=1, nodes="n[1-2]")
    runs.set_states(tmp_path, {"101": "RUNNING", "999": "FAILED"})
    data = runs.read_jobs(tmp_path)
    (job,) = data["jobs"]
    assert job["state"] == "RUNNING" and job["requeues"] == 1
    assert [a.get("outcome") for a in job["attempts"]] == ["requeued", None]
    assert runs.active_jobs(data) == [job]


# ------------------------------------------------------------------------------------- status


def test_status_table_from_run_files(capsys, launcher_shards, tmp_path):
    import json
    import time

    code, out, _ = run_cli(capsys, "status", "--runs-dir", tmp_path / "runs")
    assert code == 0 and "no runs in" in out

    run_dir = tmp_path / "runs" / "demo"
    spec, _ = load_job(launcher_job_dict(launcher_shards))
    spec.name = "demo"
    runs.write_run(run_dir, spec)
    runs.add_job(run_dir, "local-1", kind="local", state="RUNNING")
    runs.record_start(run_dir, "local-1", restart_count=0, world_size=2)
    (run_dir / "progress.json").write_text(json.dumps({
        "step": 10, "total_steps": 40, "loss": 0.25, "best_metric": None, "best_metric_name": "val/loss",
        "samples_per_s": 80.0, "updated": time.time(), "state": "running"}))
    code, out, _ = run_cli(capsys, "status", "--runs-dir", tmp_path / "runs")
    assert code == 0
    row = next(line for line in out.splitlines() if "demo" in line)
    assert "RUNNING" in row and "10/40" in row and "0.25" in row and "local-1" in row
    assert "0:03" in row  # ETA: 30 steps x 8 samples / 80 samples/s

    code, out, _ = run_cli(capsys, "status", "demo", "--runs-dir", tmp_path / "runs")
    assert code == 0 and "jobs of demo" in out and "tensorboard --logdir" in out
    code, _, err = run_cli(capsys, "status", "nosuch", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "no run 'nosuch'" in err and "demo" in err


# ---------------------------------------------------------------------------------------- CLI


DOCUMENTED_SUBCOMMANDS = ["submit", "status", "resume", "cancel", "logs", "sweep", "report", "config", "clusters"]  # README: python -m launcher <name>


def test_one_table_maps_subcommands(capsys):
    assert list(COMMANDS) == DOCUMENTED_SUBCOMMANDS
    proc = subprocess.run([sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^ {4}(\S+)", proc.stdout, flags=re.MULTILINE)  # one row per subcommand
    assert listed == DOCUMENTED_SUBCOMMANDS, proc.stdout
    for name in DOCUMENTED_SUBCOMMANDS:  # each name reaches its own row: its own usage
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: launcher {name} ")
    with pytest.raises(SystemExit) as exit_:
        main(["sumbit"])
    assert exit_.value.code == 2 and "invalid choice: 'sumbit'" in capsys.readouterr().err


# --------------------------------------------------------------------------------- jobs/*.yaml


@pytest.fixture(scope="module")
def simulated_sets(tmp_path_factory):
    """Small simulated sets of the tasks the shipped jobs train on."""
    from shards.simulate import simulate

    root = tmp_path_factory.mktemp("sim")
    return {task: simulate(task, 48, root / task, instrument="euclid", workers=1) and root / task
            for task in ("halo_mass", "substructure", "axion_mass", "subhalo_fraction")}


def stream_set(job: Path, root: Path) -> Path:
    """A small set of what the job's ``data.stream`` renders (another seed): what its stream must agree with."""
    from lenstrain.config.schema import StreamConfig
    from lenstrain.data.stream import stream_plan
    from shards.cli import main as shards_main

    stream = StreamConfig(**yaml.safe_load(job.read_text())["data"]["stream"])
    plan, problems = stream_plan(stream)
    assert not problems, problems
    out = root / job.stem
    assert shards_main(["simulate", *plan.flags, "--seed", str(stream.seed + 1), "--n", "48", "--workers", "1",
                        "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_every_shipped_job_validates(job, simulated_sets, tmp_path):
    # The shipped jobs' targets, losses, metrics and model options are checked against a real set of
    # their task (for a stream, of its stream's physics); batch 1 lets a small set stand in for a full-size one.
    if "stream" in (yaml.safe_load(job.read_text()).get("data") or {}):
        shards = stream_set(job, tmp_path)
    else:
        task = next((t for t in ("substructure", "axion_mass", "subhalo_fraction") if t in job.stem), "halo_mass")
        shards = simulated_sets[task]
    # A fine-tuning job's model.init_from names a run the README trains first; tests/test_finetune.py checks
    # init_from against real runs.
    finetune = ["model.init_from=null"] if "init_from" in job.read_text() else []
    spec, profile = load_job(job, [f"data.shards={shards}", "data.batch_size=1", *finetune])
    assert spec.resources.world_size >= 1
    assert profile.name == spec.resources.cluster
