"""The sweep's commands: ``sweep FILE``, ``sweep report SWEEP``, and what ``status``, ``cancel`` and
``resume`` do when they name a sweep directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from launcher import runs
from launcher.cliargs import add_job_args, add_runs_dir
from launcher.lifecycle.processes import live_jobs, terminate
from launcher.values import valid_run_name
from lenstrain.checkpointing.rundir import RunDir
from shards.clikit import UsageError


def sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a sweep YAML (e.g. jobs/sweeps/NAME.yaml); or `report` followed by SWEEP")
    p.add_argument(
        "sweep", nargs="?", help="with `report`: the sweep (its name under runs/, or its directory)"
    )
    p.add_argument("--name", help="the sweep's name (default: the file's name:, else its stem)")
    p.add_argument(
        "--run-dir", type=Path, default=None, help="the sweep's directory (default: RUNS_DIR/NAME)"
    )
    add_job_args(p, nproc=False)  # a trial runs as one process here, as the base job's tasks on SLURM
    for action in p._actions:
        if action.dest == "set":
            action.help = (
                "override a sweep key (trials=6, space.optim.lr=...) or a base job key (train.max_steps=100)"
            )
    add_runs_dir(p)


def find(ref: str, runs_dir: Path | None) -> Path:
    from launcher.sweep.paths import find_sweep

    root = find_sweep(ref, runs_dir)
    if root is None:
        raise UsageError(
            f"no sweep {ref!r} (looked for {Path(runs_dir or runs.DEFAULT_RUNS_DIR) / ref}/sweep.yaml)"
        )
    return root


def sweep(args) -> int:
    from launcher.sweep.report import report
    from launcher.sweep.spec import load_sweep
    from launcher.sweep.submit import check_sweep_dir, start

    if str(args.file) == "report":
        if not args.sweep:
            raise UsageError(
                "sweep report: name the sweep, e.g. python -m launcher sweep report smoke_lr_optimizer"
            )
        return report(find(args.sweep, args.runs_dir))
    if args.sweep:
        raise UsageError(f"sweep: unexpected argument {args.sweep!r} (only `sweep report SWEEP` takes two)")
    path = Path(args.file)
    spec, base = load_sweep(path, args.set)
    spec.name = args.name or spec.name or path.stem
    if not valid_run_name(spec.name):
        where = "--name" if args.name else ("name" if spec.name != path.stem else f"the file name {path.name}")
        raise UsageError(f"sweep name ({where}): {spec.name!r}: use letters, digits, '_', '-' and '.' (it names "
                         f"runs/NAME/)")
    root = runs.run_dir_for(spec.name, args.run_dir, args.runs_dir)
    return start(root, spec, base, args, check_sweep_dir(root, spec, base.spec.to_dict()))


def status(root: Path, args=None) -> int:
    del args  # the sweep's status has no options
    from launcher.status import console
    from launcher.sweep.status import show

    return show(root, console())


def resume(root: Path, args) -> int:
    from launcher.spec import read_job
    from launcher.sweep.spec import BaseJob
    from launcher.sweep.study import ask_lock, open_study, read_sweep_dir, reap
    from launcher.sweep.submit import start

    spec, job = read_sweep_dir(root)
    spec.parallel = next(
        (int(s.split("=", 1)[1]) for s in args.set if s.startswith("parallel=")), spec.parallel
    )
    sets = [s for s in args.set if not s.startswith("parallel=")]
    bad = [s for s in sets if not s.startswith("resources.")]
    if bad:
        raise UsageError(
            f"resume {root.name}: only resources.* and parallel may change; not {', '.join(bad)}"
        )
    base = BaseJob.of(*read_job(job, sets))
    study = open_study(root, spec)
    with ask_lock(root):
        for line in reap(root, study, spec):
            print(f"[launcher] {line}")
    return start(root, spec, base, args, "continue")


def cancel(root: Path, args=None) -> int:
    """scancel the sweep's array (or SIGTERM its local workers); running trials checkpoint and wait for resume."""
    del args  # cancel has no options
    from launcher import slurm
    from launcher.sweep.status import refresh_arrays

    data = refresh_arrays(root)
    active = [j["job_id"] for j in runs.active_jobs(data)]
    here = live_jobs(data)
    if not active and not here:
        print(f"sweep {root.name} has no active job")
        return 0
    mark_trials_cancelled(root)
    if active and not slurm.scancel(active):
        raise UsageError(f"scancel {' '.join(active)} failed; is SLURM reachable (SLURM_CONF)?")
    runs.set_states(root, dict.fromkeys(active, "CANCELLED"))
    for job in here:
        terminate(job)
    print(
        f"cancelled sweep {root.name} ({', '.join(active + [j['job_id'] for j in here])}); running trials "
        f"checkpoint if the grace time allows. Continue with: python -m launcher resume {root.name}"
        + (" --local" if here and not active else "")
    )
    return 0


def mark_trials_cancelled(root: Path) -> None:
    """In each running trial's run, its job's ``cancel_requested``: the trial stops as a cancelled run does."""
    from optuna.trial import TrialState

    from launcher.sweep.study import SweepDir, open_study, read_sweep_dir

    spec, _ = read_sweep_dir(root)
    for trial in open_study(root, spec).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner") or {}
        job_id = owner.get("job") or f"local-{owner.get('host')}-{owner.get('pid')}"
        run_dir = SweepDir(root).trial(trial.number)
        if RunDir(run_dir).jobs.is_file():
            runs.update_jobs(run_dir, lambda d, j=job_id: [x.update(cancel_requested=time.time())
                                                           for x in d["jobs"] if x["job_id"] == j])
