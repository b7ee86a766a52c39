"""The launcher's subcommands; ``launcher/__main__.py`` lists them in its :class:`~shards.clikit.Command` table.

Exit statuses: 0 done; 2 a job or command that cannot be used (nothing submitted); 1 a run whose own files
(``job.yaml``, ``jobs.json``) cannot be read (:class:`~launcher.runs.BrokenRunError`, naming the file); training's
own status for ``--local`` runs (42: stopped after a checkpoint, run again to resume; 128+N: a rank was
killed by signal N).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launcher import runs
from launcher.cliargs import add_job_args, add_runs_dir
from launcher.spec import read_job
from launcher.sweep import cli as sweep_cli
from launcher.sweep.cli import sweep, sweep_args  # noqa: F401 - rows of the COMMANDS table
from launcher.sweep.paths import find_sweep
from lenstrain.rundir import RunDir
from shards.clikit import UsageError

# ------------------------------------------------------------------------------------ arguments


def submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job YAML (resources + training sections)")
    p.add_argument("--name", help="run name (default: the job's name, else the file's stem)")
    p.add_argument("--run-dir", type=Path, default=None, help="the run's directory (default: RUNS_DIR/NAME)")
    add_job_args(p)
    p.add_argument("--profile", action="append_const", dest="set", const="train.profile={}",
                   help="trace steps 6-10 with torch.profiler into RUN/profile/ (train.profile)")
    add_runs_dir(p)


def resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name (or its directory)")
    add_job_args(p)
    for action in p._actions:
        if action.dest == "set":
            action.help = "override a resources.* key, e.g. resources.time=04:00:00 (training keys are fixed)"
    add_runs_dir(p)


def status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="one run (name or directory): adds its jobs and attempts")
    add_runs_dir(p)


def cancel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name (or its directory)")
    add_runs_dir(p)


def logs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run name (or its directory)")
    p.add_argument("--task", type=int, default=0, help="global rank whose log to show (default 0)")
    p.add_argument("--job", help="job id (default: the newest)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while the job is active")
    p.add_argument("--err", action="store_true", help="only the task's stderr")
    add_runs_dir(p)


# ------------------------------------------------------------------------------------- commands


def submit(args) -> int:
    from launcher.launch import launch, plan

    spec, profile, problems = read_job(args.job, args.set)
    name = args.name or spec.name or args.job.stem
    run_dir = runs.run_dir_for(name, args.run_dir, args.runs_dir)
    return launch(plan(spec, profile, problems, name, run_dir, args, job_ref=str(args.job)), args.dry_run)


def resume(args) -> int:
    from launcher.launch import launch, plan

    if (sweep_dir := find_sweep(args.run, args.runs_dir)) is not None:
        return sweep_cli.resume(sweep_dir, args)
    run_dir = runs.find_run(args.run, args.runs_dir)
    spec, profile, problems = read_job(runs.read_job_dict(run_dir), args.set)
    job = plan(spec, profile, problems, spec.name or run_dir.name, run_dir, args, job_ref=str(RunDir(run_dir).job))
    return launch(job, args.dry_run)


def status(args) -> int:
    from launcher import status as status_mod

    if args.run and (sweep_dir := find_sweep(args.run, args.runs_dir)) is not None:
        return sweep_cli.status(sweep_dir)
    return status_mod.show(args.runs_dir, args.run)


def cancel(args) -> int:
    from launcher import local
    from launcher.status import refresh_states, use_run_cluster

    if (sweep_dir := find_sweep(args.run, args.runs_dir)) is not None:
        return sweep_cli.cancel(sweep_dir)
    run_dir = runs.find_run(args.run, args.runs_dir)
    use_run_cluster(run_dir)
    data, _ = refresh_states(run_dir)
    active = [j["job_id"] for j in runs.active_jobs(data)]
    here = local.live_jobs(data)
    if not active and not here:
        print(f"run {run_dir.name} has no active job")
        return 0
    if active:
        cancel_slurm(run_dir, active)
    for job in here:
        print(f"stopping local job {job['job_id']} of run {run_dir.name}: its ranks save a checkpoint and exit",
              flush=True)
        if not local.stop_job(run_dir, job):
            raise UsageError(f"the ranks of local job {job['job_id']} are still running; "
                             f"kill them with: kill -9 {' '.join(map(str, job['rank_pids']))}")
        print(f"stopped local job {job['job_id']}. Continue later with: "
              f"{local.resume_command(run_dir, job.get('nproc', 1))}")
    return 0


def cancel_slurm(run_dir: Path, active: list[str]) -> None:
    from launcher import slurm

    def mark(d: dict) -> None:
        for job in d["jobs"]:
            if job["job_id"] in active:
                job["cancel_requested"] = time.time()

    runs.update_jobs(run_dir, mark)
    if not slurm.scancel(active):
        raise UsageError(f"scancel {' '.join(active)} failed; is SLURM reachable (SLURM_CONF)?")
    runs.set_states(run_dir, dict.fromkeys(active, "CANCELLED"))
    print(f"cancelled job(s) {', '.join(active)} of run {run_dir.name}; training checkpoints on SIGTERM if "
          f"the grace time allows. Continue later with: python -m launcher resume {run_dir.name}")


def logs(args) -> int:
    from launcher import slurm
    from launcher.status import use_run_cluster

    run_dir = runs.find_run(args.run, args.runs_dir)
    use_run_cluster(run_dir)
    data = runs.read_jobs(run_dir)
    jobs = [j for j in data["jobs"] if args.job is None or j["job_id"] == args.job]
    if not jobs:
        raise UsageError(f"run {run_dir.name} has no job {args.job}" if args.job else f"run {run_dir.name} has no job yet")
    job = jobs[-1]
    if job.get("kind") == "local":
        files = [RunDir(run_dir).logs / f"{job['job_id']}_{args.task}.log"]
    else:
        base = RunDir(run_dir).submitit / f"{job['job_id']}_{args.task}_log"
        files = [Path(f"{base}.err")] if args.err else [Path(f"{base}.out"), Path(f"{base}.err")]
    existing = [f for f in files if f.is_file()]
    if not existing and not args.follow:
        raise UsageError(f"no log for task {args.task} of job {job['job_id']} yet (looked for {files[0]})")
    offsets = dict.fromkeys(files, 0)

    def pump() -> None:
        for f in files:
            if f.is_file():
                with open(f, errors="replace") as fh:
                    fh.seek(offsets[f])
                    chunk = fh.read()
                    offsets[f] = fh.tell()
                if chunk:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()

    pump()
    if not args.follow:
        return 0
    try:
        while True:
            time.sleep(1.0)
            pump()
            if job.get("kind") == "local":
                state = (runs.find_job(runs.read_jobs(run_dir), job["job_id"]) or {}).get("state")
            else:
                state = slurm.squeue_state(job["job_id"])
            if state is None or state.split()[0] not in runs.ACTIVE_STATES:
                time.sleep(1.0)
                pump()
                return 0
    except KeyboardInterrupt:
        return 0
