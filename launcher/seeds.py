"""Seeds as one command: ``launcher submit JOB --seeds 0,1,2`` and ``launcher report NAME``.

``--seeds`` makes one run per seed, ``NAME-s0``, ``NAME-s1``, ... (the job with ``seed`` set), each an ordinary
run directory. On SLURM they go as ONE job array (``--array=0-(n-1)%n``), one array task per seed, each task
training its own run with the job's nodes and tasks; ``jobs.json`` of each run records its array task as
``ARRAYID_i``, which is how SLURM names it (``squeue``, ``sacct``, ``scontrol requeue`` take it). Preemption,
requeue and resume work per seed as for any run. With ``--local`` the seeds train here in turn.

``launcher report NAME`` evaluates each seed's best checkpoint on the test split (``lenstrain eval``, reusing
``RUN/eval/test/metrics.json`` when it is of that checkpoint already), prints each metric's mean ± standard
deviation over the seeds, and writes a CSV: one row per seed, then ``mean`` and ``std``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
from pathlib import Path

from launcher import runs
from launcher.launch import (
    Launch,
    check_slurm,
    plan,
    print_dry_run_end,
    refuse_active,
    start_local,
    submit_then,
)
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.config.schema import ConfigError
from shards.clikit import UsageError

_SEEDS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
MAX_SEEDS = 100


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or a mix) -> the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _SEEDS.match(part)
        if not match:
            raise UsageError(f"--seeds {text!r}: expected seeds like 0,1,2 or 0-4")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise UsageError(f"--seeds {text!r}: {part.strip()} is an empty range")
        seeds += range(lo, hi + 1)
    seeds = list(dict.fromkeys(seeds))
    if not 1 <= len(seeds) <= MAX_SEEDS:
        raise UsageError(f"--seeds {text!r}: give 1 to {MAX_SEEDS} seeds")
    return seeds


def seed_name(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def plan_seeds(spec, profile, problems, name: str, seeds: list[int], args, job_ref: str) -> list[Launch]:
    """One planned run per seed: the job with ``seed`` set, named ``NAME-sSEED``."""
    jobs = []
    for seed in seeds:
        copy = spec.model_copy(deep=True)
        copy.seed = seed
        run_name = seed_name(name, seed)
        jobs.append(plan(copy, profile, problems, run_name, runs.run_dir_for(run_name, None, args.runs_dir), args,
                         job_ref))
    return jobs


def _problems(jobs: list[Launch]) -> list:
    return list(dict.fromkeys(p for job in jobs for p in job.problems))


def launch_seeds(jobs: list[Launch], dry_run: bool) -> int:
    first = jobs[0]
    problems = _problems(jobs)
    if first.profile is None or (problems and not dry_run):
        raise ConfigError(problems=problems)
    states = [runs.check_run(job.run_dir, job.spec) for job in jobs]
    if dry_run:
        print_dry_run(jobs, states, problems)
        return 0
    todo = []
    for job, state in zip(jobs, states, strict=True):
        progress = (runs.read_progress(job.run_dir) or {}) if state == "resubmit" else {}
        if progress.get("state") == "done":
            print(f"run {job.name} is complete (step {progress.get('step')}); skipping it")
        else:
            todo.append((job, state))
    if not todo:
        print(f"every seed is complete; `python -m launcher report {_base_name(first.name)}` reports them")
        return 0
    if first.local:
        for job, state in todo:
            code = start_local(job, state)
            if code:
                return code
        return 0
    return submit_array(todo)


def _base_name(run_name: str) -> str:
    return re.sub(r"-s\d+$", "", run_name)


def array_parameters(jobs: list[Launch]) -> dict:
    """submitit parameters of the seeds' array: the job's own, with a teardown that finds each task's run."""
    from launcher.slurm import executor_parameters, python_command

    first = jobs[0]
    name = _base_name(first.name)
    params = executor_parameters(first.spec, first.profile, name, first.run_dir)
    dirs = " ".join(shlex.quote(str(j.run_dir)) for j in jobs)
    names = " ".join(shlex.quote(j.name) for j in jobs)
    recover = " ".join([
        'LENSTRAIN_JOB_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"', python_command(), "-m launcher.recovery",
        '"${run_dirs[$SLURM_ARRAY_TASK_ID]}"', '--name "${run_names[$SLURM_ARRAY_TASK_ID]}"',
        "--max-requeues", str(first.spec.resources.max_requeues), '--status "$status"'])
    params["teardown"] = ["status=$?", f"run_dirs=({dirs})", f"run_names=({names})",
                          f'[ "$status" -eq 0 ] || {recover}', 'exit "$status"']
    params["array_parallelism"] = len(jobs)
    return params


def array_folder(jobs: list[Launch]) -> Path:
    """The array's submitit folder (scripts, pickles, every seed's task logs): the first seed's."""
    return RunDir(jobs[0].run_dir).submitit


def print_dry_run(jobs: list[Launch], states: list[str], problems) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from launcher.slurm import submitit_command

    first = jobs[0]
    print(f"# {len(jobs)} seed(s): " + ", ".join(f"{j.name} (seed {j.spec.seed}, {s} run)"
                                                for j, s in zip(jobs, states, strict=True)))
    print(f"# resolved job of the first -> {RunDir(first.run_dir).job}")
    print(first.spec.to_yaml().rstrip())
    print()
    if first.local:
        print(f"# local: the seeds train here in turn, {first.nproc} process(es) each")
    else:
        folder = array_folder(jobs)
        print(f"# sbatch script -> {folder}/%A_%a_submission.sh (ONE job array, task i = seed {jobs[0].spec.seed}, ...)")
        print(_make_sbatch_string(command=submitit_command(folder), folder=folder, map_count=len(jobs),
                                  **array_parameters(jobs)).rstrip())
    if first.then:
        print(f"\n# then: {', '.join(first.then)} for each seed, after its array task (afterok)"
              if not first.local else f"\n# then: {', '.join(first.then)} after each seed, here")
    print_dry_run_end(problems, "these runs")


def submit_array(todo: list[tuple[Launch, str]]) -> int:
    import submitit

    from launcher import slurm
    from launcher.entry import TrainTask

    jobs = [job for job, _ in todo]
    first = jobs[0]
    partition = check_slurm(first)
    for job, state in todo:
        if state == "resubmit":
            refuse_active(job)
    for job in jobs:
        runs.write_run(job.run_dir, job.spec)
    res = first.spec.resources
    folder = array_folder(jobs)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues, python=slurm.python_command())
    executor.update_parameters(**array_parameters(jobs))
    with executor.batch():
        handles = [executor.submit(TrainTask(job.run_dir, max_requeues=res.max_requeues, name=job.name,
                                             array_task=True)) for job in jobs]
    ids = [str(h.job_id) for h in handles]
    array_id = ids[0].split("_")[0]
    for job, job_id in zip(jobs, ids, strict=True):
        runs.add_job(job.run_dir, job_id, kind="slurm", array=array_id, submitit_dir=str(folder),
                     cluster=first.profile.name, partition=partition, nodes=res.nodes,
                     tasks_per_node=res.ntasks_per_node, time_min=res.time_minutes)
    base = _base_name(first.name)
    print(f"submitted {len(jobs)} seed run(s) of {base} as SLURM job array {array_id} "
          f"(--array=0-{len(jobs) - 1}%{len(jobs)}): {res.nodes} node(s) x {res.ntasks_per_node} task(s) each, "
          f"partition {partition or '(default)'}, {res.time_minutes} min, cluster {first.profile.name}")
    for job, job_id in zip(jobs, ids, strict=True):
        print(f"  {job.name:<24} seed {job.spec.seed:<4} job {job_id:<14} {runs.display_path(job.run_dir)}")
        if job.then:
            submit_then(job, job_id)
    print("  status:      python -m launcher status")
    print(f"  report:      python -m launcher report {base}   (once they are done)")
    return 0


# ------------------------------------------------------------------------------------ report


def seed_runs(name: str, runs_dir: Path | None) -> list[tuple[int, Path]]:
    """The runs ``NAME-sSEED`` under ``runs_dir``, by seed."""
    pattern = re.compile(rf"^{re.escape(name)}-s(\d+)$")
    found = []
    for run_dir in runs.list_runs(runs_dir):
        match = pattern.match(run_dir.name)
        if match:
            found.append((int(match.group(1)), run_dir))
    return sorted(found)


def _eval_metrics(run_dir: Path, split: str) -> dict:
    """The run's metrics on ``split`` with its best checkpoint: ``eval`` again unless it already ran on it."""
    from lenstrain.evaluation.evaluate import choose_checkpoint, main_eval, read_run_config

    cfg = read_run_config(run_dir)
    checkpoint, _ = choose_checkpoint(run_dir, "best", cfg.checkpoint.best_metric, cfg.checkpoint.best_mode,
                                      log=lambda message: None)
    path = RunDir(run_dir).eval / split / "metrics.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("checkpoint") == str(checkpoint) and done.get("tta_rotations") == cfg.train.tta_rotations:
            print(f"[launcher] {run_dir.name}: {split} metrics of {checkpoint.name} from {runs.display_path(path)}")
            return done
    code = main_eval(argparse.Namespace(run=run_dir, split=split, checkpoint="best", shards=None, tta=None))
    if code:
        raise UsageError(f"{run_dir.name}: lenstrain eval stopped with status {code}")
    return json.loads(path.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def report(name: str, runs_dir: Path | None, split: str = "test", out: Path | None = None) -> int:
    found = seed_runs(name, runs_dir)
    if not found:
        known = ", ".join(sorted({_base_name(p.name) for p in runs.list_runs(runs_dir) if re.search(r"-s\d+$", p.name)}))
        raise UsageError(f"no runs {name}-s0, {name}-s1, ... in {runs_dir or runs.DEFAULT_RUNS_DIR}/ "
                         f"(submit them with `launcher submit JOB --name {name} --seeds 0,1,2`); "
                         f"seed groups there: {known or 'none'}")
    rows, pending = [], []
    for seed, run_dir in found:
        progress = runs.read_progress(run_dir) or {}
        if progress.get("state") != "done":
            pending.append(f"{run_dir.name} ({progress.get('state', 'not started')}, step {progress.get('step', 0)})")
            continue
        result = _eval_metrics(run_dir, split)
        rows.append({"seed": seed, "run": run_dir.name, "step": result.get("step"), **result["metrics"]})
    if pending:
        print(f"[launcher] not finished, left out: {', '.join(pending)}")
    if not rows:
        raise UsageError(f"no finished seed of {name} to report yet; watch them with `python -m launcher status`")
    metrics = [k for k in rows[0] if k not in ("seed", "run", "step")]
    summary = {}
    for metric in metrics:
        values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
        if values:
            summary[metric] = mean_std(values)
    print(f"{name}: {split} split, best checkpoint of each of {len(rows)} seed(s) "
          f"({', '.join(str(r['seed']) for r in rows)})")
    width = max(len(m) for m in metrics)
    for metric, (mean, std) in summary.items():
        each = "  ".join(f"{r[metric]:.4f}" for r in rows if isinstance(r.get(metric), (int, float)))
        print(f"  {split}/{metric:<{width}}  {mean:.4f} ± {std:.4f}   (seeds: {each})")
    out = Path(out) if out is not None else Path(runs_dir or runs.DEFAULT_RUNS_DIR) / f"{name}-seeds-{split}.csv"
    write_csv(out, rows, metrics, summary)
    print(f"wrote {runs.display_path(out)}")
    return 0


def write_csv(out: Path, rows: list[dict], metrics: list[str], summary: dict) -> None:
    """One row per seed, then ``mean`` and ``std``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seed", "run", "step", *metrics])
        for r in rows:
            writer.writerow([r["seed"], r["run"], r["step"], *(_cell(r.get(m)) for m in metrics)])
        writer.writerow(["mean", "", "", *(_cell(summary[m][0]) if m in summary else "" for m in metrics)])
        writer.writerow(["std", "", "", *(_cell(summary[m][1]) if m in summary else "" for m in metrics)])


def _cell(value) -> str:
    return "" if value is None else f"{value:.8g}"
