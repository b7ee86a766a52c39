"""Every file and field a user hands us, crafted: the twelve reproductions of issue 18, each a test.

Each one is refused with exit 2 (bad input) or 1 (corruption found), with one ``error:`` line that names the key
or the file and no traceback; nothing is overwritten and no code runs. The test names carry the item's number.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launcher import runs
from launcher.values import valid_run_name
from lenstrain.checkpointing.stateio import COMPLETE
from shards.manifest import MANIFEST_NAME, ManifestError, load_manifest
from shards.pack import OutputExistsError, lock_path
from tests.factories import LAUNCHER_JOB, config_dict, launcher_job_dict, write_config
from tests.hardening_helpers import (
    assert_refused,
    copy_run,
    launcher_cli,
    lenstrain_cli,
    make_run,
    sbatch_part,
    script_structure_problems,
    seal,
    shards_cli,
    tree_bytes,
    write_marker,
)
from tests.train_helpers import ROOT, env, lenstrain

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


class RunsCommand:
    """Pickles as a call of ``os.system``: a full unpickle of it creates ``canary``."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """No SLURM reachable, and a submission would fail the test."""
    import launcher.slurm

    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(launcher.slurm, "submit", refuse)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")


def write_job(path: Path, shards: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(launcher_job_dict(shards, **sections), sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ 1. the sbatch script

SBATCH_KEYS = ["account", "qos", "constraint", "partition"]


@pytest.mark.parametrize("key", SBATCH_KEYS)
def test_01_a_newline_in_an_sbatch_value_exits_2_naming_the_key(tmp_path, ring_shards, key):
    canary = tmp_path / "pwned"
    value = f"acct\ntouch {canary} #"
    runs_dir = tmp_path / "runs"
    job = write_job(tmp_path / "job.yaml", ring_shards, resources={key: value})
    assert_refused(launcher_cli("submit", job, "--dry-run", "--runs-dir", runs_dir), 2, f"resources.{key}")

    clean = write_job(tmp_path / "clean.yaml", ring_shards)
    quoted = json.dumps(value)  # a YAML double-quoted scalar: its \n is a newline (a plain one folds to a space)
    by_set = launcher_cli("submit", clean, "--dry-run", "--runs-dir", runs_dir, "--set", f"resources.{key}={quoted}")
    assert_refused(by_set, 2, f"resources.{key}")
    assert "#SBATCH" not in by_set.out  # no script printed
    assert not canary.exists() and not runs_dir.exists()


def test_01_a_newline_from_a_sweep_space_exits_2_naming_the_key(tmp_path, ring_shards):
    base = write_job(tmp_path / "base.yaml", ring_shards, resources={"nodes": 1})
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "sw", "base": str(base), "trials": 2,
                                     "space": {"resources.account": {"choice": ["a", "b\ntouch x #"]}}}))
    result = launcher_cli("sweep", sweep, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert_refused(result, 2, "space.resources.account")


@pytest.mark.parametrize("line", ["module load cuda\ntouch /tmp/x", "#SBATCH --time=999"])
def test_01_a_setup_line_must_be_one_line_and_no_directive(tmp_path, ring_shards, line):
    job = write_job(tmp_path / "job.yaml", ring_shards, resources={"setup": ["module purge", line]})
    assert_refused(launcher_cli("submit", job, "--dry-run", "--runs-dir", tmp_path / "runs"), 2,
                   "resources.setup.1")


def test_01_a_run_directory_with_a_newline_never_reaches_the_script(tmp_path, ring_shards):
    job = write_job(tmp_path / "job.yaml", ring_shards)
    result = launcher_cli("submit", job, "--dry-run", "--run-dir", tmp_path / "run\ntouch x")
    assert_refused(result, 2, "--run-dir")


@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_01_every_generated_script_passes_bash_n_with_its_options_before_any_command(tmp_path, ring_shards, job):
    """The dry-run script of every job in jobs/, on the devcluster and on the example GPU profile (setup lines
    and srun arguments of its own): bash accepts it, and every #SBATCH line precedes the first command."""
    for extra in (["resources.cluster=devcluster"], ["resources.cluster=example-gpu", "resources.gpus_per_node=4", "resources.cpus_per_task=8",
                       "resources.constraint=a100&nvlink", "resources.setup=[export X=1, 'echo \"$X\" > /dev/null']"]):
        sets = [x for item in [f"data.shards={ring_shards}", *extra] for x in ("--set", item)]
        result = launcher_cli("submit", job, "--dry-run", "--runs-dir", tmp_path / "runs", *sets)
        assert "Traceback" not in result.text
        assert "#!/bin/bash" in result.out, result.text
        script = sbatch_part(result.out)
        assert script_structure_problems(script) == [], script
        options = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        assert any(line.startswith("#SBATCH --time=") for line in options)
        assert "#SBATCH --requeue" in options and any(line.startswith("#SBATCH --signal=") for line in options)


# ------------------------------------------------------------------------------------ 2. DeepSpeed's pickles


def planted_deepspeed_run(tmp_path: Path, shards: Path, canary: Path, zero: bool = False) -> tuple[Path, Path]:
    """A DeepSpeed run whose checkpoint holds a pickle that calls ``os.system``, with its COMPLETE rewritten to
    list it (the marker is a checksum, not a signature). Returns the run and the planted file."""
    run = make_run(tmp_path / "run", shards, steps=(2,), parallel={"strategy": "deepspeed", "zero_stage": 0})
    step_dir = run / "checkpoints" / "step-00000002"
    good = torch.load(step_dir / "model.pt", weights_only=True)
    (step_dir / "model.pt").unlink()
    (step_dir / "deepspeed").mkdir()
    states = step_dir / "deepspeed" / "mp_rank_00_model_states.pt"
    if zero:  # the model states are plain; a ZeRO partition carries the payload
        torch.save({"module": good}, states)
        planted = step_dir / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        torch.save({"optimizer_state_dict": RunsCommand(canary)}, planted)
    else:
        torch.save({"module": good, "extra": RunsCommand(canary)}, states)
        planted = states
    seal(step_dir)
    return run, planted


@pytest.mark.parametrize("zero", [False, True], ids=["model-states", "zero-partition"])
def test_02_a_planted_deepspeed_pickle_is_refused_by_export_and_eval(tmp_path, ring_shards, zero):
    canary = tmp_path / "canary"
    run, planted = planted_deepspeed_run(tmp_path, ring_shards, canary, zero)
    before = tree_bytes(run)
    out = tmp_path / "m.safetensors"
    line = assert_refused(lenstrain_cli("export", run, "--out", out), 1, planted, "posix.system")
    assert "refused" in line
    assert_refused(lenstrain_cli("eval", run), 1, planted, "posix.system")
    assert not canary.exists() and not out.exists()
    assert tree_bytes(run) == before


@pytest.mark.slow
def test_02_a_planted_deepspeed_pickle_is_refused_on_resume(tmp_path, ring_shards, monkeypatch):
    """Training builds a real DeepSpeed engine, whose load would unpickle the file fully: it is scanned first."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    canary = tmp_path / "canary"
    run, planted = planted_deepspeed_run(tmp_path, ring_shards, canary)
    before = tree_bytes(run / "checkpoints")
    proc = lenstrain("train", run / "config.yaml", "--run-dir", run)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    [line] = [s for s in proc.stdout.splitlines() if "error:" in s]
    assert str(planted) in line and "posix.system" in line, line
    assert not canary.exists()
    assert tree_bytes(run / "checkpoints") == before


# ------------------------------------------------------------------------------------ 3. train --run-dir


@pytest.mark.parametrize(("change", "key"), [({"model": {"name": "resnet18"}}, "model.name"),
                                             ({"optim": {"lr": 0.01}}, "optim.lr")])
def test_03_training_another_config_into_a_run_is_refused_before_anything_is_written(tmp_path, ring_shards,
                                                                                    change, key):
    run = make_run(tmp_path / "run", ring_shards)
    before = tree_bytes(run)
    other = write_config(tmp_path / "other.yaml", ring_shards, **change)
    result = lenstrain_cli("train", other, "--run-dir", run)
    assert_refused(result, 2, run / "config.yaml")
    assert f"  {key}: " in result.err
    assert tree_bytes(run) == before


def test_03_the_same_config_resumes_and_a_launcher_run_is_held_to_its_keys(tmp_path, ring_shards):
    from lenstrain.checkpointing.rundir import RunDir
    from lenstrain.cli import check_same_run
    from lenstrain.config.schema import load_config

    run = make_run(tmp_path / "run", ring_shards)
    same = write_config(tmp_path / "same.yaml", ring_shards)
    assert check_same_run(RunDir(run), load_config(same)) is True
    assert check_same_run(RunDir(tmp_path / "new"), load_config(same)) is False


# ------------------------------------------------------------------------------------ 4. two writers of --out


def test_04_a_second_writer_of_the_same_out_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "sets" / "x"
    out.parent.mkdir()
    with open(lock_path(out), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = shards_cli("simulate", "--task", "halo_mass", "--n", "4", "--preset", "euclid", "--size", "16",
                            "--workers", "1", "--out", out)
    assert_refused(result, 2, out, lock_path(out))
    assert not out.exists()


class AppearsMeanwhile:
    """A sample function that, at its first sample, makes a shard set appear at ``out`` (another writer)."""

    def __init__(self, out: Path):
        self.out = out

    def __call__(self, i: int):
        import numpy as np

        if i == 0 and not self.out.exists():
            self.out.mkdir()
            (self.out / MANIFEST_NAME).write_text("{\"theirs\": true}")
        return np.full((1, 4, 4), float(i), np.float32), {"y": float(i)}


def test_04_publishing_never_replaces_a_set_that_appeared_meanwhile(tmp_path):
    from shards.options import PackOptions
    from shards.pack import TargetSpec, pack_shard_set

    out = tmp_path / "x"
    with pytest.raises(OutputExistsError, match="appeared while this shard set was being written"):
        pack_shard_set(out, sample_fn=AppearsMeanwhile(out), split_of=["train"] * 6,
                       targets=[TargetSpec("y", "regression")], primary_target="y", source={},
                       options=PackOptions(workers=1))
    assert (out / MANIFEST_NAME).read_text() == "{\"theirs\": true}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging directory, no lock file left


@pytest.mark.slow
def test_04_two_simulations_started_at_once_publish_one_set(tmp_path):
    out = tmp_path / "x"
    cmd = [sys.executable, "-m", "shards", "simulate", "--task", "halo_mass", "--n", "6", "--preset", "euclid",
           "--size", "16", "--workers", "1", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    assert sum("wrote" in out_ for _, out_, _ in results) == 1, results
    [(_, _, err)] = [r for r in results if r[0] == 2]
    assert "Traceback" not in err and len([s for s in err.splitlines() if s.startswith("error:")]) == 1, err
    assert shards_cli("verify", out).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# ------------------------------------------------------------------------------------ 5. --out of export, predict


def test_05_export_refuses_an_existing_file_and_its_sidecar_without_force(tmp_path, ring_shards):
    run = make_run(tmp_path / "run", ring_shards)
    shard_set = tmp_path / "set"
    shutil.copytree(ring_shards, shard_set)
    before = tree_bytes(shard_set)
    assert_refused(lenstrain_cli("export", run, "--out", shard_set / "manifest.pt"), 2,
                   shard_set / "manifest.json", "--force")
    assert tree_bytes(shard_set) == before

    out = tmp_path / "m.safetensors"
    assert lenstrain_cli("export", run, "--out", out).code == 0
    written = tree_bytes(tmp_path)
    assert_refused(lenstrain_cli("export", run, "--out", out), 2, out)
    assert_refused(lenstrain_cli("export", run, "--out", tmp_path / "m.pt"), 2, tmp_path / "m.json")
    assert tree_bytes(tmp_path) == written
    assert lenstrain_cli("export", run, "--out", out, "--force").code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically: no temporary left


def test_05_predict_refuses_an_existing_file_without_force_and_writes_atomically(tmp_path, ring_shards):
    run = make_run(tmp_path / "run", ring_shards)
    before = tree_bytes(run)
    assert_refused(lenstrain_cli("predict", run, "--shards", ring_shards, "--out", run / "config.yaml"), 2,
                   run / "config.yaml", "--force")
    assert tree_bytes(run) == before
    out = tmp_path / "p.csv"
    assert lenstrain_cli("predict", run, "--shards", ring_shards, "--out", out).code == 0
    first = out.read_bytes()
    assert_refused(lenstrain_cli("predict", run, "--shards", ring_shards, "--out", out), 2, out)
    assert out.read_bytes() == first
    assert lenstrain_cli("predict", run, "--shards", ring_shards, "--out", out, "--force").code == 0
    assert out.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "run"]


# ------------------------------------------------------------------------------------ 6. a corrupt jobs.json


def launcher_run(runs_dir: Path, name: str, shards: Path) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    job = launcher_job_dict(shards, name=name)
    (run / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    (run / "config.yaml").write_text(yaml.safe_dump(config_dict(shards, **{k: v for k, v in LAUNCHER_JOB.items()
                                                                           if k != "resources"})))
    return run


def test_06_a_corrupt_jobs_json_is_refused_by_the_commands_and_moved_aside_by_a_job(tmp_path, ring_shards):
    runs_dir = tmp_path / "runs"
    run = launcher_run(runs_dir, "r", ring_shards)
    launcher_run(runs_dir, "fine", ring_shards)
    corrupt = b'{"run": "r", "jobs": [{"job_id": "12'
    (run / "jobs.json").write_bytes(corrupt)

    listing = launcher_cli("status", "--runs-dir", runs_dir)
    assert listing.code == 0 and "Traceback" not in listing.text
    assert "BROKEN" in listing.out and "fine" in listing.out and str(run / "jobs.json") in listing.out
    for argv in (["status", "r"], ["resume", "r", "--local"], ["cancel", "r"], ["logs", "r"]):
        assert_refused(launcher_cli(*argv, "--runs-dir", runs_dir), 1, run / "jobs.json")
    assert (run / "jobs.json").read_bytes() == corrupt
    assert not (run / "checkpoints").exists()

    # Inside a job, which must go on: moved aside with a warning, its bytes kept.
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        runs.record_start(run, "123", restart_count=0)
    [aside] = run.glob("jobs.json.corrupt-*")
    assert aside.read_bytes() == corrupt
    assert f"warning: {run / 'jobs.json'}" in err.getvalue() and str(aside) in err.getvalue()
    assert [j["job_id"] for j in runs.read_jobs(run)["jobs"]] == ["123"]


# ------------------------------------------------------------------------------------ 7. run names


@pytest.mark.parametrize("name", ["x\n", "x\ny", "../x", "-x", ""])
def test_07_a_run_name_must_be_a_whole_plain_name(tmp_path, ring_shards, name):
    assert not valid_run_name(name)
    job = write_job(tmp_path / "job.yaml", ring_shards)
    runs_dir = tmp_path / "runs"
    if name:
        assert_refused(launcher_cli("submit", job, "--dry-run", "--runs-dir", runs_dir, f"--name={name}"), 2,
                       "run name")
    named = write_job(tmp_path / "named.yaml", ring_shards, name=name)
    assert_refused(launcher_cli("submit", named, "--dry-run", "--runs-dir", runs_dir), 2, "name")
    assert not runs_dir.exists()


def test_07_a_sweep_name_with_a_trailing_newline_is_refused(tmp_path, ring_shards):
    base = write_job(tmp_path / "base.yaml", ring_shards, resources={"nodes": 1})
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(base), "trials": 2, "space": {"optim.lr": {"choice": [0.1, 0.2]}}}))
    assert_refused(launcher_cli("sweep", sweep, "--dry-run", "--name", "sw\n", "--runs-dir", tmp_path / "r"), 2,
                   "--name")
    sweep.write_text(yaml.safe_dump({"name": "sw\n", "base": str(base), "trials": 2,
                                     "space": {"optim.lr": {"choice": [0.1, 0.2]}}}))
    assert_refused(launcher_cli("sweep", sweep, "--dry-run", "--runs-dir", tmp_path / "r"), 2, "name")


# ------------------------------------------------------------------------------------ 8, 9. manifests


def with_manifest_change(tmp_path: Path, shards: Path, change) -> Path:
    """A copy of the shard set whose manifest ``change`` (a function of the manifest dict) edited."""
    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    change(data)
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def first_shard(data: dict, split: str = "test") -> dict:
    return data["splits"][split]["shards"][0]


@pytest.mark.parametrize("name", ["../other/test-000000.tar", "/etc/passwd", "sub/test-000000.tar", ".."])
def test_08_a_shard_name_outside_the_set_is_refused_naming_manifest_and_field(tmp_path, ring_shards, name):
    other = tmp_path / "other"
    shutil.copytree(ring_shards, other)
    shard_set = with_manifest_change(tmp_path, ring_shards, lambda d: first_shard(d).update(name=name))
    manifest = shard_set / MANIFEST_NAME
    line = assert_refused(shards_cli("verify", shard_set), 1, manifest, "splits.test.shards.0.name")
    assert "OK" not in line
    with pytest.raises(ManifestError, match="not a plain file name"):
        load_manifest(shard_set)
    config = write_config(tmp_path / "c.yaml", shard_set)
    assert_refused(lenstrain_cli("train", config, "--run-dir", tmp_path / "run"), 2, "data.shards", manifest)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", [10**13, -5])
def test_09_a_member_size_out_of_bounds_is_refused_naming_manifest_and_field(tmp_path, ring_shards, size):
    shard_set = with_manifest_change(tmp_path, ring_shards,
                                     lambda d: first_shard(d, "train")["members"][0].update(image_size=size))
    field = "splits.train.shards.0.members.0.image_size"
    assert_refused(shards_cli("verify", shard_set), 1, shard_set / MANIFEST_NAME, field)
    assert_refused(shards_cli("inspect", shard_set), 1, shard_set / MANIFEST_NAME, field)
    config = write_config(tmp_path / "c.yaml", shard_set)
    assert_refused(lenstrain_cli("train", config, "--run-dir", tmp_path / "run"), 2, "data.shards", field)


def test_09_members_past_the_end_of_their_shard_are_named_not_read(tmp_path, ring_shards):
    """Sizes within the schema but past the file: verify names the member, the reader refuses it."""
    from shards.reader import CorruptSampleError, ShardReader

    def grow(data):
        shard = first_shard(data, "train")
        shard["bytes"] += 10**9
        shard["members"][-1]["json_offset"] += 10**9 - 100
    shard_set = with_manifest_change(tmp_path, ring_shards, grow)
    result = shards_cli("verify", shard_set)
    assert result.code == 1 and "Traceback" not in result.text
    assert "train-000000.tar" in result.out and "truncated" in result.out
    reader = ShardReader(shard_set, "train")
    last = len(load_manifest(shard_set).splits["train"].shards[0].members) - 1
    with pytest.raises(CorruptSampleError, match="train-000000.tar"):
        reader.read(last)


# ------------------------------------------------------------------------------------ 10. COMPLETE markers

BAD_MARKERS = {
    "files-a-list": {"files": ["model.pt"]},
    "a-list": [1, 2],
    "bytes-missing": None,  # filled in from the real marker
    "not-json": "{\"step\": 4, ",
    "outside": None,
}


def bad_marker(kind: str, step_dir: Path):
    real = json.loads((step_dir / COMPLETE).read_text())
    if kind == "bytes-missing":
        del real["files"]["model.pt"]["bytes"]
        return real
    if kind == "outside":
        real["files"]["../../config.yaml"] = real["files"]["model.pt"]
        return real
    return BAD_MARKERS[kind]


@pytest.mark.parametrize("kind", list(BAD_MARKERS))
def test_10_a_badly_shaped_complete_marker_names_the_marker_or_falls_back(tmp_path, ring_shards, kind):
    base = make_run(tmp_path / "base", ring_shards)
    newest = "checkpoints/step-00000004"

    only = copy_run(base, tmp_path / "only")
    shutil.rmtree(only / "checkpoints" / "step-00000002")
    write_marker(only / newest, bad_marker(kind, only / newest))
    assert_refused(lenstrain_cli("export", only, "--out", tmp_path / "a.pt"), 1, only / newest / COMPLETE)
    assert_refused(lenstrain_cli("eval", only), 1, only / newest / COMPLETE)

    both = copy_run(base, tmp_path / "both")
    write_marker(both / newest, bad_marker(kind, both / newest))
    result = lenstrain_cli("export", both, "--out", tmp_path / "b.pt")
    assert result.code == 0, result.text
    assert "step-00000004 is not usable" in result.out and "from step-00000002" in result.out


def test_10_a_truncated_model_file_that_matches_its_entry_is_named_or_passed_over(tmp_path, ring_shards):
    base = make_run(tmp_path / "base", ring_shards)
    for name in ("only", "both"):
        run = copy_run(base, tmp_path / name)
        if name == "only":
            shutil.rmtree(run / "checkpoints" / "step-00000002")
        model = run / "checkpoints" / "step-00000004" / "model.pt"
        model.write_bytes(model.read_bytes()[:500])
        seal(model.parent)  # the marker matches the truncated file
        out = tmp_path / f"{name}.safetensors"
        if name == "only":
            assert_refused(lenstrain_cli("export", run, "--out", out), 1, model)
            assert_refused(lenstrain_cli("eval", run, "--checkpoint", "latest"), 1, model)
            assert not out.exists()
        else:
            result = lenstrain_cli("export", run, "--out", out)
            assert result.code == 0 and str(model) in result.out and "from step-00000002" in result.out, result.text
            evaluated = lenstrain_cli("eval", run, "--checkpoint", "latest")
            assert evaluated.code == 0 and "step 2, the one before step-00000004" in evaluated.out, evaluated.text


@pytest.mark.slow
def test_10_training_resumes_from_the_checkpoint_before_an_unreadable_one(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 8},
                          checkpoint={"every_steps": 4, "keep": 3, "every_minutes": None})
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, check=True)
    model = run / "checkpoints" / "step-00000008" / "model.pt"
    model.write_bytes(model.read_bytes()[:500])
    seal(model.parent)
    again = lenstrain("train", config, "--run-dir", run)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert f"checkpoint step-00000008 cannot be read ({model}" in again.stdout
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'}" in again.stdout
    from lenstrain.checkpointing.checkpoint import load_model_state, verify_checkpoint

    assert verify_checkpoint(model.parent) is None and load_model_state(model.parent)  # written anew

    # Every checkpoint unreadable: one line naming the newest's file, exit 1, nothing started over.
    for step_dir in (run / "checkpoints").iterdir():
        (step_dir / "model.pt").write_bytes(b"not a checkpoint")
        seal(step_dir)
    before = tree_bytes(run / "checkpoints")
    failed = lenstrain("train", config, "--run-dir", run)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    [line] = [s for s in failed.stdout.splitlines() if "error:" in s]
    assert "no usable checkpoint" in line and str(run / "checkpoints" / "step-00000008" / "model.pt") in line
    assert tree_bytes(run / "checkpoints") == before


# ------------------------------------------------------------------------------------ 11. a broken job.yaml


def test_11_a_run_with_an_unparseable_job_yaml_is_broken_and_the_others_are_listed(tmp_path, ring_shards):
    runs_dir = tmp_path / "runs"
    launcher_run(runs_dir, "fine", ring_shards)
    broken = launcher_run(runs_dir, "broken", ring_shards)
    (broken / "job.yaml").write_text("resources: [unclosed\n")
    before = tree_bytes(broken)

    listing = launcher_cli("status", "--runs-dir", runs_dir)
    assert listing.code == 0 and "Traceback" not in listing.text, listing.text
    assert "fine" in listing.out and "BROKEN" in listing.out and str(broken / "job.yaml") in listing.out
    one = launcher_cli("status", "broken", "--runs-dir", runs_dir)
    assert one.code == 1 and "BROKEN" in one.out and str(broken / "job.yaml") in one.out
    assert_refused(launcher_cli("resume", "broken", "--runs-dir", runs_dir), 1, broken / "job.yaml")
    assert tree_bytes(broken) == before


# ------------------------------------------------------------------------------------ 12. errors name their file


def test_12_a_bad_value_in_a_runs_config_names_the_file(tmp_path, ring_shards):
    run = make_run(tmp_path / "run", ring_shards)
    config = run / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["optim"]["lr"] = -1
    config.write_text(yaml.safe_dump(data))
    before = tree_bytes(run)
    for argv in (["export", run, "--out", tmp_path / "m.pt"], ["eval", run], ["train", config, "--run-dir", run]):
        result = lenstrain_cli(*argv)
        line = assert_refused(result, 2, config, "optim.lr")
        assert str(config) in line
    assert tree_bytes(run) == before


def test_12_a_full_disk_while_simulating_names_the_shard_set(tmp_path):
    """A write past the file-size limit fails as a full disk does (EFBIG for ENOSPC): the error names the set."""
    out = tmp_path / "x"

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "shards", "simulate", "--task", "halo_mass", "--n", "6", "--preset",
                           "euclid", "--size", "32", "--workers", "1", "--out", str(out)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300, preexec_fn=limit_files)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
    assert str(out) in line and "File too large" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no set, no staging directory, no lock file


def test_12_the_run_lock_is_held_from_the_check_to_the_jobs_record(tmp_path, ring_shards, monkeypatch):
    import launcher.launch
    import launcher.slurm

    run_dir = tmp_path / "runs" / "locked"
    seen = {}

    def lock_is_held() -> bool:
        with open(run_dir / ".jobs.json.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    real_check = runs.check_run

    def check(*args, **kwargs):  # the last check, the one the submission follows, is made under the lock
        seen["at check"] = run_dir.is_dir() and lock_is_held()
        return real_check(*args, **kwargs)

    def submit(*args, **kwargs):
        seen["at submit"] = lock_is_held()
        return "4242"

    monkeypatch.setattr(runs, "check_run", check)
    monkeypatch.setattr(launcher.launch, "check_slurm", lambda job: "debug")
    monkeypatch.setattr(launcher.slurm, "submit", submit)
    job = write_job(tmp_path / "job.yaml", ring_shards)
    result = launcher_cli("submit", job, "--run-dir", run_dir)
    assert result.code == 0, result.text
    assert seen == {"at check": True, "at submit": True}
    assert [j["job_id"] for j in runs.read_jobs(run_dir)["jobs"]] == ["4242"]
    assert not lock_is_held()
