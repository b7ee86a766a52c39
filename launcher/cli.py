"""The launcher's subcommands; ``launcher/__main__.py`` lists them in its :class:`~shards.clikit.Command` table.

Exit statuses: 0 done; 2 a job or command that cannot be used (nothing submitted); 1 a run whose own files
(``job.yaml``, ``jobs.json``) cannot be read (:class:`~launcher.runs.BrokenRunError`, naming the file); training's
own status for ``--local`` runs (42: stopped after a checkpoint, run again to resume; 128+N: a rank was
killed by signal N).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from launcher import runs
from launcher.cliargs import add_job_args, add_runs_dir
from launcher.spec import read_job
from launcher.sweep import cli as sweep_cli
from launcher.sweep.cli import sweep, sweep_args  # noqa: F401 - rows of the COMMANDS table
from launcher.sweep.paths import find_sweep
from lenstrain.checkpointing.rundir import RunDir
from shards.clikit import UsageError

# ------------------------------------------------------------------------------------ arguments


def submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job YAML (resources + training sections)")
    p.add_argument("--name", help="run name (default: the job's name, else the file's stem)")
    p.add_argument("--run-dir", type=Path, default=None, help="the run's directory (default: RUNS_DIR/NAME)")
    add_job_args(p)
    p.add_argument("--profile", action="append_const", dest="set", const="train.profile={}",
                   help="trace steps 6-10 with torch.profiler into RUN/profile/ (train.profile)")
    p.add_argument("--seeds", metavar="S,S,...",
                   help="one run per seed (NAME-s0, NAME-s1, ...) as ONE SLURM job array, or in turn with --local; "
                        "e.g. 0,1,2 or 0-4; then `launcher report NAME`")
    p.add_argument("--then", metavar="STEPS",
                   help="steps after training: eval (test split), export (RUN/export/model.safetensors), e.g. "
                        "eval,export; on SLURM one job that depends on the training (afterok), with --local in turn")
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
    p.add_argument("--job", help="job id (default: the newest training job; a --then steps job by its id)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing while the job is active")
    p.add_argument("--err", action="store_true", help="only the task's stderr")
    add_runs_dir(p)


# ------------------------------------------------------------------------------------- commands


def submit(args) -> int:
    from launcher.launch import launch, plan

    spec, profile, problems = read_job(args.job, args.set)
    name = args.name or spec.name or args.job.stem
    if args.seeds is not None:
        from launcher.seeds import launch_seeds, parse_seeds, plan_seeds

        if args.run_dir is not None:
            raise UsageError("--seeds names each run NAME-sSEED under --runs-dir; it takes no --run-dir")
        jobs = plan_seeds(spec, profile, problems, name, parse_seeds(args.seeds), args, job_ref=str(args.job))
        return launch_seeds(jobs, args.dry_run)
    run_dir = runs.run_dir_for(name, args.run_dir, args.runs_dir)
    return launch(plan(spec, profile, problems, name, run_dir, args, job_ref=str(args.job)), args.dry_run)


def named(ref: str, runs_dir: Path | None) -> tuple[str, Path]:
    """What a name given to ``resume``, ``status`` or ``cancel`` refers to, asked here only: ``("sweep", its
    directory)`` or ``("run", its directory)``; a :class:`ConfigError` when it is neither."""
    sweep_dir = find_sweep(ref, runs_dir)
    if sweep_dir is not None:
        return "sweep", sweep_dir
    return "run", runs.find_run(ref, runs_dir)


def on_named(args, *, on_run: Callable[[Path, argparse.Namespace], int],
             on_sweep: Callable[[Path, argparse.Namespace], int]) -> int:
    """Run the command's form for a run or for a sweep, as :func:`named` finds ``args.run``."""
    kind, path = named(args.run, args.runs_dir)
    return (on_sweep if kind == "sweep" else on_run)(path, args)


def resume(args) -> int:
    return on_named(args, on_run=resume_run, on_sweep=sweep_cli.resume)


def status(args) -> int:
    from launcher import status as status_mod

    if not args.run:
        return status_mod.show_all(args.runs_dir)
    return on_named(args, on_run=lambda run_dir, _: status_mod.show_one(run_dir), on_sweep=sweep_cli.status)


def cancel(args) -> int:
    return on_named(args, on_run=cancel_run, on_sweep=sweep_cli.cancel)


def resume_run(run_dir: Path, args) -> int:
    from launcher.launch import launch, plan

    spec, profile, problems = read_job(runs.read_job_dict(run_dir), args.set)
    job = plan(spec, profile, problems, spec.name or run_dir.name, run_dir, args, job_ref=str(RunDir(run_dir).job))
    return launch(job, args.dry_run)


def cancel_run(run_dir: Path, args) -> int:
    from launcher import local
    from launcher.status import refresh_states, use_run_cluster

    del args
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
    from launcher.status import use_run_cluster

    run_dir = runs.find_run(args.run, args.runs_dir)
    use_run_cluster(run_dir)
    job = _logged_job(run_dir, args.job)
    files = _log_files(run_dir, job, args.task, args.err)
    if not any(f.is_file() for f in files) and not args.follow:
        raise UsageError(f"no log for task {args.task} of job {job['job_id']} yet (looked for {files[0]})")
    pump = _log_pump(files)
    pump()
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            while _still_active(run_dir, job):
                time.sleep(1.0)
                pump()
            time.sleep(1.0)
            pump()
    return 0


def _logged_job(run_dir: Path, job_id: str | None) -> dict:
    """The job whose log to show: ``job_id``'s, else the newest training job (``--then`` steps by their id)."""
    data = runs.read_jobs(run_dir)
    if job_id is None:
        jobs = [j for j in data["jobs"] if not j.get("steps")] or data["jobs"]
    else:
        jobs = [j for j in data["jobs"] if j["job_id"] == job_id]
    if not jobs:
        raise UsageError(f"run {run_dir.name} has no job {job_id}" if job_id else f"run {run_dir.name} has no job yet")
    return jobs[-1]


def _log_files(run_dir: Path, job: dict, task: int, err_only: bool) -> list[Path]:
    if job.get("kind") == "local":
        return [RunDir(run_dir).logs / f"{job['job_id']}_{task}.log"]
    # a --seeds array keeps every seed's logs in one submitit folder
    folder = Path(job["submitit_dir"]) if job.get("submitit_dir") else RunDir(run_dir).submitit
    base = folder / f"{job['job_id']}_{task}_log"
    return [Path(f"{base}.err")] if err_only else [Path(f"{base}.out"), Path(f"{base}.err")]


def _log_pump(files: list[Path]) -> Callable[[], None]:
    """A function that prints what the files gained since it last ran."""
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

    return pump


def _still_active(run_dir: Path, job: dict) -> bool:
    from launcher import slurm

    if job.get("kind") == "local":
        state = (runs.find_job(runs.read_jobs(run_dir), job["job_id"]) or {}).get("state")
    else:
        state = slurm.squeue_state(job["job_id"])
    return state is not None and state.split()[0] in runs.ACTIVE_STATES


# ------------------------------------------------------------------------------------- clusters


def clusters_args(p: argparse.ArgumentParser) -> None:
    del p  # no options: every profile on the search path


def clusters(args) -> int:
    """Every cluster profile on the search path, with the file it came from; ``*`` marks the default."""
    from launcher.clusters import (
        CLUSTERS_ENV,
        DEFAULT_CLUSTER_ENV,
        default_cluster,
        load_profile,
        profile_files,
    )
    from lenstrain.config.schema import ConfigError

    del args
    found = profile_files()
    default = default_cluster()
    print("cluster profiles (first file of a name wins; search order: $" + CLUSTERS_ENV
          + ", ~/.config/lenstrain/clusters/, slurm/clusters/):")
    for name, files in found.items():
        try:
            p = load_profile(name)
            what = (f"{p.kind}, partition {p.partition or '(default)'}, "
                    + (f"{p.gpus_per_node} GPU(s)/node" if p.gpus_per_node else "CPU only")
                    + (f", at most {p.max_nodes} node(s)" if p.max_nodes else ""))
        except ConfigError as exc:
            what = "INVALID: " + str(exc).splitlines()[-1].strip()
        mark = "*" if name == default else " "
        print(f"{mark} {name:<16} {runs.display_path(files[0])}  ({what})")
        for shadowed in files[1:]:
            print(f"  {'':<16} {runs.display_path(shadowed)}  (shadowed)")
    if default not in found:
        print(f"warning: the default profile {default!r} (${DEFAULT_CLUSTER_ENV}) is not among them", file=sys.stderr)
    print(f"* the default for a job without resources.cluster (${DEFAULT_CLUSTER_ENV}, else devcluster): {default}")
    return 0


# --------------------------------------------------------------------------------------- config


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", type=Path, help="job YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, as submit --set does (repeatable)")


def config(args) -> int:
    """The job resolved: its ``base:`` chain merged, ``--set`` applied and every default filled in."""
    from shards.clikit import format_problems

    spec, _, problems = read_job(args.job, args.set)
    spec.name = spec.name or args.job.stem
    print(f"# {args.job} resolved (base: chain merged, --set applied, every default filled in; "
          f"keys: launcher/docs/config.md)")
    print(spec.to_yaml().rstrip())
    if problems:
        print("\n".join(f"# {line}" for line in format_problems(problems, "warning").splitlines()))
    return 0


# --------------------------------------------------------------------------------------- report


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the name given to submit --seeds (its runs are NAME-s0, NAME-s1, ...)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: RUNS_DIR/NAME-seeds.csv)")
    add_runs_dir(p)


def report(args) -> int:
    from launcher.seeds import report as seed_report

    return seed_report(args.name, args.runs_dir, args.split, args.out)

