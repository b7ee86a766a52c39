"""The launcher against the real devcluster: multi-node training, and every way a job is interrupted
(partition preemption, time limit, ``scancel --signal=USR2``, external ``scontrol requeue``, cancel and
resume, a task killed, a rank hung, a node lost) ends with weights bit-identical to one uninterrupted run.

Each interrupted run checkpoints collectively, is requeued (by its rank 0, or by SLURM), resumes from
its newest complete checkpoint and completes. Every wait is bounded. ``-s`` prints the timelines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.__main__ import main
from launcher.slurm import render_sbatch
from launcher.spec import load_job
from lenstrain.checkpointing.checkpoint import COMPLETE, latest_complete, list_checkpoints, read_meta
from tests.factories import assert_same_weights, final_weights, launcher_job_dict
from tests.slurm_helpers import (
    DEVCLUSTER,
    sacct_records,
    sacct_state,
    sbatch,
    scancel,
    scontrol_job,
    slurm,
    squeue_jobs,
    task_pids,
    wait_for,
)

pytestmark = pytest.mark.slurm

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 80  # long enough that a preemption (about 1-2 s from an urgent submission) lands mid-run on an idle machine


# ------------------------------------------------------------------------------------- helpers


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def submit(job: Path, runs_dir: Path, name: str, *sets: str) -> tuple[str, Path]:
    args = [x for s in sets for x in ("--set", s)]
    assert cli("submit", job, "--runs-dir", runs_dir, "--name", name, *args) == 0
    run_dir = runs_dir / name
    return runs.read_jobs(run_dir)["jobs"][-1]["job_id"], run_dir


def task_log(run_dir: Path, job_id: str, task: int = 0) -> str:
    base = run_dir / "submitit" / f"{job_id}_{task}_log"
    return "".join(Path(f"{base}.{ext}").read_text() if Path(f"{base}.{ext}").exists() else "" for ext in ("out", "err"))


def step_of(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_step(run_dir: Path, job_id: str, step: int, timeout: float = 120) -> int:
    def reached():
        if sacct_state(job_id) in FINAL:
            raise AssertionError(f"job {job_id} ended before step {step}:\n{task_log(run_dir, job_id)}")
        return step_of(run_dir) >= step

    wait_for(reached, timeout, interval=0.05, what=f"step {step} of job {job_id}")
    return step_of(run_dir)


def wait_final(run_dir: Path, job_id: str, timeout: float = 240) -> str:
    try:
        state = wait_for(lambda: (s := sacct_state(job_id)) in FINAL and s, timeout, interval=0.5,
                         what=f"job {job_id} to end")
    except TimeoutError:
        raise AssertionError(f"job {job_id} did not end:\n{task_log(run_dir, job_id)}") from None
    return state


def wait_attempt_ended(run_dir: Path, job_id: str, index: int = 0, timeout: float = 120) -> dict:
    def ended():
        job = runs.find_job(runs.read_jobs(run_dir), job_id) or {}
        attempts = job.get("attempts", [])
        return len(attempts) > index and "ended" in attempts[index] and attempts[index]

    return wait_for(ended, timeout, interval=0.1, what=f"attempt {index + 1} of job {job_id} to end")


def stop_checkpoint(run_dir: Path, job_id: str) -> tuple[int, dict]:
    """The complete checkpoint at the step where the first attempt stopped on its signal: saved for the
    signal, or the periodic one when the signal came at a periodic step (every 10)."""
    step = runs.find_job(runs.read_jobs(run_dir), job_id)["attempts"][0]["step"]
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (path / COMPLETE).is_file(), f"no complete checkpoint at step {step}"
    meta = read_meta(path)
    assert meta["reason"] == "signal 12" or (meta["reason"] == "periodic" and step % 10 == 0), meta
    return step, meta


def signal_checkpoints(run_dir: Path) -> list[tuple[int, dict]]:
    out = []
    for step, path in list_checkpoints(run_dir / "checkpoints"):
        if (path / COMPLETE).is_file() and read_meta(path).get("reason", "").startswith("signal"):
            out.append((step, read_meta(path)))
    return out


def assert_completed_after_requeue(run_dir: Path, job_id: str, reference: dict, outcome: str) -> dict:
    """Common end checks of an interrupted run; returns the job's record."""
    state = wait_final(run_dir, job_id)
    log = task_log(run_dir, job_id)
    assert state == "COMPLETED", log
    job = runs.find_job(runs.read_jobs(run_dir), job_id)
    attempts = job["attempts"]
    assert len(attempts) >= 2, job
    assert attempts[0]["outcome"] == outcome, job
    assert attempts[-1]["outcome"] == "completed" and attempts[-1]["step"] == STEPS, job
    assert job["state"] == "COMPLETED" and job["requeues"] >= 1
    assert "resumed from" in log, log
    assert len(sacct_records(job_id)) >= 2  # SLURM's accounting also has every attempt
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "done"
    assert_same_weights(reference, final_weights(run_dir))
    return job


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 10)}"


def timeline(title: str, events: list[tuple[str, float]]) -> str:
    t0 = events[0][1]
    lines = [f"{title}:"] + [f"  {clock(t)}  +{t - t0:5.1f} s  {what}" for what, t in events]
    return "\n".join(lines)


def sacct_start(job_id: str, index: int) -> float | None:
    out = slurm("sacct", "-X", "-D", "-n", "-P", "-o", "Start", "-j", job_id, check=False).stdout.split()
    if len(out) <= index or out[index] in ("Unknown", "None"):
        return None
    return time.mktime(time.strptime(out[index], "%Y-%m-%dT%H:%M:%S"))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    assert squeue_jobs() == [], "the devcluster has jobs already"
    yield slurm_cluster
    leftover = [j["jobid"] for j in squeue_jobs()]
    scancel(*leftover)


@pytest.fixture(scope="module")
def base(tmp_path_factory, launcher_shards) -> Path:
    """The job every test runs: 2 nodes x 1 task, STEPS (80) steps, checkpoints every 10."""
    path = tmp_path_factory.mktemp("jobs") / "train.yaml"
    path.write_text(yaml.safe_dump(launcher_job_dict(launcher_shards, train={"max_steps": STEPS})))
    return path


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict:
    """The uninterrupted run: the same job with --local and 2 processes."""
    runs_dir = tmp_path_factory.mktemp("reference")
    assert cli("submit", base, "--local", "--nproc", "2", "--runs-dir", runs_dir, "--name", "ref") == 0
    return final_weights(runs_dir / "ref")


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


# --------------------------------------------------------------------------------------- tests


def submitted_since(start: str, name: str) -> list[str]:
    """Job ids named ``name`` that SLURM's accounting has seen submitted since ``start``."""
    out = slurm("sacct", "-X", "-n", "-P", "-o", "JobID", "-S", start, "--name", name, check=False).stdout
    return out.split()


def test_bad_jobs_submit_nothing(cluster, base, runs_dir, capsys):
    # Accounting records of earlier tests' jobs may still be arriving: look only for this run's name.
    start = time.strftime("%Y-%m-%dT%H:%M:%S")
    bad = [
        (["resources.nodse=2"], "resources.nodse: unknown key"),
        (["resources.nodes=3"], "resources.nodes: 3 nodes requested"),
        (["resources.cpus_per_task=4"], "resources.cpus_per_task"),
        (["data.shards=/nonexistent"], "data.shards"),
        (["resources.partition=nosuch"], "resources.partition: unknown partition 'nosuch'; valid choices: debug, urgent"),
        (["optim.lr=fast"], "optim.lr: Input should be a valid number"),
    ]
    for sets, expected in bad:
        args = [x for s in sets for x in ("--set", s)]
        assert cli("submit", base, "--runs-dir", runs_dir, *args) == 2
        assert expected in capsys.readouterr().err
    assert squeue_jobs() == []
    assert submitted_since(start, "train") == []
    assert not (runs_dir / "train").exists()


def test_two_nodes_train_to_the_same_weights_as_local(cluster, base, reference, runs_dir, capsys):
    job_id, run_dir = submit(base, runs_dir, "twonodes")
    assert "submitted run twonodes as SLURM job" in capsys.readouterr().out
    state = wait_final(run_dir, job_id)
    log = task_log(run_dir, job_id)
    assert state == "COMPLETED", log
    assert "2 rank(s) on cpu" in log
    job = runs.find_job(runs.read_jobs(run_dir), job_id)
    assert job["state"] == "COMPLETED" and job["requeues"] == 0
    assert job["attempts"][0]["nodes"] == "n[1-2]" and job["attempts"][0]["world_size"] == 2
    assert_same_weights(reference, final_weights(run_dir))

    # What was submitted is what --dry-run prints.
    spec, profile = load_job(run_dir / "job.yaml")
    submitted = (run_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert submitted.strip() == render_sbatch(spec, profile, run_dir, "twonodes").strip()

    assert cli("status", "--runs-dir", runs_dir) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "twonodes" in line)
    assert "COMPLETED" in row and f"{STEPS}/{STEPS}" in row and job_id in row


def test_partition_preemption_checkpoints_requeues_and_resumes(cluster, base, reference, runs_dir, capsys):
    job_id, run_dir = submit(base, runs_dir, "preempted")
    wait_step(run_dir, job_id, 5)
    t_urgent = time.time()
    # Both nodes' CPUs, on the partition with the higher priority tier: it preempts the training job.
    urgent = sbatch("-p", "urgent", "-N2", "-c2", "-J", "urgent", "-o", "/dev/null", "--wrap", "sleep 2")
    job = assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued")
    assert sacct_state(urgent) == "COMPLETED"
    step, meta = stop_checkpoint(run_dir, job_id)
    assert 5 <= step < STEPS
    first, second = job["attempts"][:2]
    t_restart = sacct_start(job_id, 1)
    text = timeline(f"partition preemption of job {job_id} (2 nodes x 1 task)", [
        ("urgent job submitted (SIGUSR2 to every rank)", t_urgent),
        (f"checkpoint step-{step:08d} complete (collective)", meta["time"]),
        ("rank 0 requeued the job (scontrol requeue), tasks exited 42", first["ended"]),
        ("SLURM started the job again", t_restart or first["ended"]),
        (f"task running again, resuming from step {step}", second["started"]),
        (f"training complete (step {STEPS})", job["attempts"][-1]["ended"]),
    ])
    with capsys.disabled():
        print(text)
    capsys.readouterr()
    assert cli("status", "preempted", "--runs-dir", runs_dir) == 0
    out = capsys.readouterr().out
    assert "requeued" in out and "completed" in out


def next_timelimit_check(tmp: Path, timeout: float = 45) -> float:
    """When slurmctld next runs its periodic time-limit pass (every ~30 s).

    The pass also sends --signal=SIG@N, once a job is within N s + one period of its limit, so the
    signal lands anywhere in a 30 s window unless a job is started at the right moment. A probe job
    whose signal is due at once learns the phase of the pass.
    """
    marker = tmp / "probe"
    probe = sbatch("--time=1", "--signal=B:USR2@59", "-c1", "-J", "probe", "-o", "/dev/null",
                   "--wrap", f"trap 'date +%s.%N > {marker}; exit 0' USR2; sleep 100 & wait")
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip(), timeout, interval=0.05, what="the probe's signal")
    finally:
        scancel(probe)
    seen = float(marker.read_text())
    upcoming = seen + 30.5
    while upcoming - time.time() < 11:
        upcoming += 30.5
    return upcoming


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, base, reference, runs_dir, tmp_path):
    # time=1 min with --signal=USR2@50: slurmctld's pass signals a job once it is within the delay plus
    # one period (~30 s) of its limit, so here at the first pass after the start. The job must start a
    # few seconds before a pass, so that the signal comes while its tasks start up (training takes only
    # a few seconds). Submitting takes a while and varies, so the job waits behind a job that holds
    # every CPU, and the blocker is cancelled at the right moment: the job then starts within ~1 s.
    check = next_timelimit_check(tmp_path)
    blocker = sbatch("-p", "debug", "-N2", "-c2", "-J", "blocker", "-o", "/dev/null", "--wrap", "sleep 300")
    try:
        wait_for(lambda: sacct_state(blocker) == "RUNNING", 30, what="the blocker to run")
        t_submit = time.time()
        job_id, run_dir = submit(base, runs_dir, "timelimit", "resources.time=1", "resources.signal_delay_s=50")
        while check - time.time() < 8:
            check += 30.5
        time.sleep(max(0.0, check - 4 - time.time()))
    finally:
        scancel(blocker)
    first = wait_attempt_ended(run_dir, job_id, timeout=120)
    # The requeued attempt gets a longer limit, so that it can finish instead of being signalled again.
    slurm("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    job = assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued")
    step, meta = stop_checkpoint(run_dir, job_id)
    t_start = sacct_start(job_id, 0) or t_submit
    print(timeline(f"time limit of job {job_id} (1 min, --signal=USR2@50)", [
        ("job started", t_start),
        (f"checkpoint step-{step:08d} complete after SIGUSR2", meta["time"]),
        ("rank 0 requeued the job", first["ended"]),
        ("task running again", job["attempts"][1]["started"]),
        (f"training complete (step {STEPS})", job["attempts"][-1]["ended"]),
    ]))


def test_scancel_usr2_checkpoints_requeues_and_resumes(cluster, base, reference, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "usr2")
    wait_step(run_dir, job_id, 5)
    slurm("scancel", "--signal=USR2", job_id)
    assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued")
    stop_checkpoint(run_dir, job_id)
    assert len(signal_checkpoints(run_dir)) <= 1


def test_external_requeue_resumes_from_newest_complete_checkpoint(cluster, base, reference, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "external")
    wait_step(run_dir, job_id, 12)  # past the periodic checkpoint at step 10
    slurm("scontrol", "requeue", job_id)  # SIGTERM only: training saves if KillWait allows
    first = wait_attempt_ended(run_dir, job_id)
    assert first["outcome"] == "requeued-by-slurm"
    newest = latest_complete(run_dir / "checkpoints", log=lambda m: None)
    assert newest is not None and read_meta(newest)["step"] >= 10
    assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued-by-slurm")
    assert f"resumed from {newest}" in task_log(run_dir, job_id)


def test_cancel_stops_without_requeue_and_resume_completes(cluster, base, reference, runs_dir, capsys):
    job_id, run_dir = submit(base, runs_dir, "cancelled")
    wait_step(run_dir, job_id, 5)
    assert cli("cancel", "cancelled", "--runs-dir", runs_dir) == 0
    assert wait_final(run_dir, job_id, timeout=60) == "CANCELLED"
    first = wait_attempt_ended(run_dir, job_id)
    assert first["outcome"] == "cancelled"
    time.sleep(2)
    assert squeue_jobs() == []  # not requeued
    capsys.readouterr()

    assert cli("resume", "cancelled", "--runs-dir", runs_dir) == 0
    assert "resumes from step-" in capsys.readouterr().out
    data = runs.read_jobs(run_dir)
    assert [j["job_id"] for j in data["jobs"]][0] == job_id and len(data["jobs"]) == 2
    second = data["jobs"][1]["job_id"]
    assert wait_final(run_dir, second) == "COMPLETED", task_log(run_dir, second)
    assert "resumed from" in task_log(run_dir, second)
    assert_same_weights(reference, final_weights(run_dir))


def test_max_requeues_is_honoured(cluster, base, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "limited", "resources.max_requeues=0")
    wait_step(run_dir, job_id, 5)
    slurm("scancel", "--signal=USR2", job_id)
    state = wait_final(run_dir, job_id, timeout=60)
    assert state == "FAILED"  # tasks exited 42 and nobody requeued the job
    job = runs.find_job(runs.read_jobs(run_dir), job_id)
    assert [a["outcome"] for a in job["attempts"]] == ["requeue-limit"]
    assert "resources.max_requeues=0" in task_log(run_dir, job_id)
    stop_checkpoint(run_dir, job_id)  # it still saved before stopping


def signal_task(run_dir: Path, job_id: str, procid: int, signum: int) -> float:
    """Send ``signum`` to one task of the job (the rank with that SLURM_PROCID); returns when."""
    pids = wait_for(lambda: task_pids(run_dir / "submitit", job_id), 30, what=f"the tasks of job {job_id}")
    os.kill(pids[procid], signum)
    return time.time()


def test_a_killed_task_requeues_the_job_which_resumes_exactly(cluster, base, reference, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "killed")
    wait_step(run_dir, job_id, 12)  # past the checkpoint at step 10
    t_kill = signal_task(run_dir, job_id, 1, signal.SIGKILL)
    first = wait_attempt_ended(run_dir, job_id)
    assert first["outcome"] == "requeued", first
    assert first["ended"] - t_kill < 30  # --kill-on-bad-exit stops rank 0 at once; the batch step requeues
    job = assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued")
    assert "a lost rank is transient; requeueing job" in task_log(run_dir, job_id)
    assert not [f for f in job.get("failures", []) if not f["transient"]], job
    assert signal_checkpoints(run_dir) == []  # no signal reached training: it resumed from a periodic checkpoint


def test_a_hung_rank_ends_the_job_by_the_collective_timeout_and_it_is_requeued(cluster, base, reference, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "hung", "parallel.timeout_s=20")
    wait_step(run_dir, job_id, 12)  # past the checkpoint at step 10
    t_stop = signal_task(run_dir, job_id, 1, signal.SIGSTOP)
    first = wait_attempt_ended(run_dir, job_id, timeout=90)
    waited = first["ended"] - t_stop
    assert 15 < waited < 60, waited  # the 20 s timeout, far from the 10 min time limit
    assert first["outcome"] == "requeued", first
    job = runs.find_job(runs.read_jobs(run_dir), job_id)
    # Rank 0 timed out; the stopped rank, woken by SLURM's SIGCONT, found its peer gone.
    assert all(f["transient"] for f in job["failures"]), job["failures"]
    timed_out = re.compile(r"time(d)?\s?out", re.IGNORECASE)  # gloo has several wordings
    assert any(f["rank"] == 0 and timed_out.search(f["why"]) for f in job["failures"]), job["failures"]
    assert_completed_after_requeue(run_dir, job_id, reference, outcome="requeued")


def devcluster_node(command: str, node: str) -> None:
    proc = subprocess.run([str(DEVCLUSTER), command, node], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_lost_node_fails_the_job_which_slurm_requeues_and_it_completes_when_the_node_returns(
        cluster, base, reference, runs_dir):
    job_id, run_dir = submit(base, runs_dir, "node-lost")
    wait_step(run_dir, job_id, 12)  # past the checkpoint at step 10
    devcluster_node("crash", "n2")  # slurmd and the job's processes on n2 stop answering
    try:
        # No collective timeout (the default 10 min) is involved: SLURM's SlurmdTimeout ends the job.
        wait_for(lambda: any(r["state"] == "NODE_FAIL" for r in sacct_records(job_id)), 150,
                 what=f"job {job_id} to fail with its node")
        assert scontrol_job(job_id).get("Requeue") == "1"  # SLURM requeues it, nobody else
    finally:
        devcluster_node("reboot", "n2")
    wait_for(lambda: len(sacct_records(job_id)) >= 2, 120, what=f"SLURM to requeue job {job_id}")
    job = assert_completed_after_requeue(run_dir, job_id, reference, outcome="lost")
    assert job["attempts"][0]["restart_count"] == 0 and job["attempts"][-1]["restart_count"] >= 1, job
