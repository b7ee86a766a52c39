"""The launcher's subcommands; ``launcher/__main__.py`` maps their names to these functions.

Exit statuses: 0 done; 2 a job or command that cannot be used (nothing submitted); training's own
status for ``--local`` runs (42: stopped after a checkpoint, run again to resume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from launcher import runs
from launcher.clusters import ClusterProfile
from launcher.spec import JobSpec, load_job
from lenstrain.config import ConfigError

EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _no_slurm_hint(problem: str, job: str) -> str:
    return (
        f"no SLURM cluster reachable: {problem}.\n"
        f"  Try the job on this machine:   python -m launcher submit {job} --local\n"
        f"  Or start the development cluster and point SLURM's commands at it:\n"
        f"    slurm/devcluster up && eval \"$(slurm/devcluster env)\""
    )


# ------------------------------------------------------------------------------------ arguments


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. optim.lr=3e-4 or resources.nodes=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved job; submit nothing")
    p.add_argument("--local", action="store_true", help="run on this machine in the foreground (CPU, or its GPUs)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local processes (default: resources.tasks_per_node, capped to this machine)")


def add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", type=Path, default=None, help="where runs live (default: runs/)")


def submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job YAML (resources + training sections)")
    p.add_argument("--name", help="run name (default: the job's name, else the file's stem)")
    p.add_argument("--run-dir", type=Path, default=None, help="the run's directory (default: RUNS_DIR/NAME)")
    add_job_args(p)
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
    try:
        spec, profile = load_job(args.job, args.set)
    except ConfigError as exc:
        return _error(str(exc))
    name = args.name or spec.name or args.job.stem
    run_dir = runs.run_dir_for(name, args.run_dir, args.runs_dir)
    return _launch(spec, profile, name, run_dir, args, job_ref=str(args.job))


def resume(args) -> int:
    try:
        run_dir = runs.find_run(args.run, args.runs_dir)
        spec, profile = load_job(runs.read_job_dict(run_dir), args.set)
    except ConfigError as exc:
        return _error(str(exc))
    return _launch(spec, profile, spec.name or run_dir.name, run_dir, args, job_ref=f"{run_dir}/{runs.JOB_FILE}")


def _launch(spec: JobSpec, profile: ClusterProfile, name: str, run_dir: Path, args, job_ref: str) -> int:
    from launcher import local, slurm
    from launcher.entry import TrainTask

    try:
        spec.name = name
    except ValidationError as exc:
        return _error(f"run name: {exc.errors()[0]['msg'].removeprefix('Value error, ')}")
    is_local = args.local or profile.kind == "local"
    nproc = None
    if is_local:
        nproc = args.nproc or local.default_nproc(spec)
        problems = local.check_local(spec, nproc)
        if problems:
            return _error("cannot run locally:\n" + "\n".join(f"  {p}: {m}" for p, m in problems))
    try:
        state = runs.check_run(run_dir, spec)
    except runs.RunConflict as exc:
        return _error(str(exc))

    progress = (runs.read_progress(run_dir) or {}) if state == "resubmit" else {}
    if progress.get("state") == "done" and not args.dry_run:
        print(f"run {name} is complete (step {progress.get('step')}/{progress.get('total_steps')}) in {run_dir}; "
              "nothing to do. Use --name NEW_NAME to train it again.")
        return 0

    if args.dry_run:
        print(f"# resolved job -> {run_dir / runs.JOB_FILE} ({state} run)")
        print(spec.to_yaml().rstrip())
        print()
        if is_local:
            print(f"# local run: {nproc} process(es) of `python -m launcher.entry {run_dir}` "
                  f"with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set")
        else:
            print(f"# sbatch script -> {run_dir / runs.SUBMITIT_DIR}/%j_submission.sh")
            print(slurm.render_sbatch(spec, profile, run_dir, name).rstrip())
        print("\n# dry run: nothing submitted")
        return 0

    if not is_local:
        slurm.use_profile_slurm_conf(profile)
        problem = slurm.slurm_problem()
        if problem:
            return _error(_no_slurm_hint(problem, job_ref))
        partition = spec.resources.partition or profile.partition
        known = slurm.partitions()
        if partition and known and partition not in known:
            return _error(f"invalid config:\n  resources.partition: unknown partition {partition!r}; "
                          f"valid choices: {', '.join(known)}")
    if state == "resubmit":
        from launcher.status import refresh_states

        data, _ = refresh_states(run_dir)
        active = runs.active_jobs(data)
        if active:
            ids = ", ".join(f"{j['job_id']} ({j['state']})" for j in active)
            return _error(f"run {name} is active already (job {ids}).\n"
                          f"  Watch it: python -m launcher status {name}; stop it: python -m launcher cancel {name}")
    runs.write_run(run_dir, spec)
    ckpt = _newest_checkpoint(run_dir)
    resumes = f"; resumes from {ckpt}" if ckpt else ""
    if is_local:
        print(f"[launcher] {'resubmitting' if state == 'resubmit' else 'starting'} run {name} locally in {run_dir}"
              f"{resumes}", flush=True)
        return local.run_local(spec, run_dir, nproc)

    task = TrainTask(run_dir, spec.training_dict(), max_requeues=spec.resources.max_requeues, name=name)
    res = spec.resources
    partition = res.partition or profile.partition
    job_id = slurm.submit(spec, profile, run_dir, name, task)
    runs.add_job(run_dir, job_id, kind="slurm", cluster=profile.name, partition=partition,
                 nodes=res.nodes, tasks_per_node=res.ntasks_per_node, time_min=res.time_minutes)
    rel = _rel(run_dir)
    print(f"submitted run {name} as SLURM job {job_id}: {res.nodes} node(s) x {res.ntasks_per_node} task(s), "
          f"partition {partition or '(default)'}, {res.time_minutes} min, cluster {profile.name}{resumes}")
    print(f"  run dir:     {rel}")
    print(f"  status:      python -m launcher status {name}")
    print(f"  logs:        python -m launcher logs {name} --follow")
    print(f"  tensorboard: tensorboard --logdir {rel}/tb")
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _newest_checkpoint(run_dir: Path) -> str | None:
    from lenstrain.checkpoint import COMPLETE, list_checkpoints

    found = [p.name for _, p in list_checkpoints(run_dir / "checkpoints") if (p / COMPLETE).is_file()]
    return found[-1] if found else None


def status(args) -> int:
    from launcher import status as status_mod

    try:
        return status_mod.show(args.runs_dir, args.run)
    except ConfigError as exc:
        return _error(str(exc))


def cancel(args) -> int:
    from launcher import slurm
    from launcher.status import refresh_states

    try:
        run_dir = runs.find_run(args.run, args.runs_dir)
        spec, profile = load_job(runs.read_job_dict(run_dir), check_shards=False)
    except ConfigError as exc:
        return _error(str(exc))
    slurm.use_profile_slurm_conf(profile)
    data, _ = refresh_states(run_dir)
    active = [j["job_id"] for j in runs.active_jobs(data)]
    if not active:
        print(f"run {run_dir.name} has no active SLURM job")
        return 0

    def mark(d: dict) -> None:
        for job in d["jobs"]:
            if job["job_id"] in active:
                job["cancel_requested"] = time.time()

    runs.update_jobs(run_dir, mark)
    if not slurm.scancel(active):
        return _error(f"scancel {' '.join(active)} failed; is SLURM reachable (SLURM_CONF)?")
    runs.set_states(run_dir, dict.fromkeys(active, "CANCELLED"))
    print(f"cancelled job(s) {', '.join(active)} of run {run_dir.name}; training checkpoints on SIGTERM if "
          f"the grace time allows. Continue later with: python -m launcher resume {run_dir.name}")
    return 0


def logs(args) -> int:
    from launcher import slurm

    try:
        run_dir = runs.find_run(args.run, args.runs_dir)
    except ConfigError as exc:
        return _error(str(exc))
    from launcher.status import _use_run_cluster

    _use_run_cluster(run_dir)
    data = runs.read_jobs(run_dir)
    jobs = [j for j in data["jobs"] if args.job is None or j["job_id"] == args.job]
    if not jobs:
        return _error(f"run {run_dir.name} has no job {args.job}" if args.job else f"run {run_dir.name} has no job yet")
    job = jobs[-1]
    if job.get("kind") == "local":
        files = [run_dir / runs.LOCAL_LOG_DIR / f"{job['job_id']}_{args.task}.log"]
    else:
        base = run_dir / runs.SUBMITIT_DIR / f"{job['job_id']}_{args.task}_log"
        files = [Path(f"{base}.err")] if args.err else [Path(f"{base}.out"), Path(f"{base}.err")]
    existing = [f for f in files if f.is_file()]
    if not existing and not args.follow:
        return _error(f"no log for task {args.task} of job {job['job_id']} yet (looked for {files[0]})")
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
