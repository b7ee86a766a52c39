"""``launcher status``: one table of runs, from progress.json, jobs.json and sacct."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launcher import runs
from launcher.lifecycle.processes import lost_jobs
from launcher.slurm import sacct_attempts, sacct_jobs, squeue_state, use_profile_slurm_conf
from lenstrain.checkpointing.rundir import RunDir

STATE_STYLES = {"RUNNING": "green", "COMPLETED": "bold green", "PENDING": "yellow", "REQUEUED": "yellow",
                "FAILED": "red", "CANCELLED": "magenta", "STOPPED": "magenta", "TIMEOUT": "red", "PREEMPTED": "yellow",
                "LOST": "red", "BROKEN": "bold red"}


def console() -> Console:
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(width=width, soft_wrap=False)


def refresh_states(run_dir: Path) -> tuple[dict, bool]:
    """jobs.json with the SLURM jobs' states refreshed from sacct, and local jobs whose processes are all
    gone marked LOST; also whether sacct answered."""
    data = runs.read_jobs(run_dir)
    lost = lost_jobs(data)
    if lost:
        runs.set_states(run_dir, dict.fromkeys(lost, "LOST"))
        data = runs.read_jobs(run_dir)
    ids = [j["job_id"] for j in data["jobs"] if j.get("kind", "slurm") == "slurm"]
    if not ids:
        return data, False
    info = sacct_jobs(ids)
    if info is None:
        return data, False
    states = {jid: row["State"] for jid, row in info.items() if row.get("State")}
    # A job accounting has never heard of (a cluster rebuilt since) and the controller does not know:
    # it cannot be active any more. Fresh submissions take a moment to reach sacct, so spare those.
    for job in data["jobs"]:
        jid = job["job_id"]
        if (job.get("kind", "slurm") == "slurm" and jid not in states and job.get("state") in runs.ACTIVE_STATES
                and time.time() - (job.get("submitted") or 0) > 60 and squeue_state(jid) is None):
            states[jid] = "UNKNOWN"
    if states:
        runs.set_states(run_dir, states)
        data = runs.read_jobs(run_dir)
    return data, True


def use_run_cluster(run_dir: Path) -> None:
    """Talk to the run's cluster (its profile's slurm.conf) unless SLURM_CONF says otherwise."""
    try:
        job = runs.read_job_dict(run_dir)
    except runs.BrokenRunError:  # its row says BROKEN, and why
        return
    use_job_cluster(job, run_dir)


def use_job_cluster(job: dict, where: Path) -> None:
    """Talk to the cluster of ``job`` (a run's, or a sweep's base job) unless SLURM_CONF says otherwise; a job
    whose profile cannot be loaded keeps the environment's SLURM, and says so in one line."""
    from launcher.clusters import load_profile
    from lenstrain.config.schema import ConfigError

    try:
        use_profile_slurm_conf(load_profile(job["resources"]["cluster"]))
    except (KeyError, TypeError, ConfigError) as exc:  # an old or odd job file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        print(f"note: {where.name}: its cluster profile is not used ({type(exc).__name__}: {reason}); SLURM as "
              f"the environment has it", file=sys.stderr)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def fmt_number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def step_cell(progress: dict) -> str:
    """``step/total`` of a run's ``progress.json`` (``-`` before its first step)."""
    step = progress.get("step")
    return f"{step}/{progress.get('total_steps')}" if step is not None else "-"


def requeue_count(run_dir: Path, data: dict) -> str:
    """The run's requeues, across resumes, against its ``resources.max_requeues``: e.g. ``1/3``."""
    count = runs.run_requeues(data)
    if not RunDir(run_dir).job.is_file():  # a run trained by `lenstrain train` alone
        return str(count)
    resources = runs.read_job_dict(run_dir).get("resources")
    limit = resources.get("max_requeues") if isinstance(resources, dict) else None
    if isinstance(limit, bool) or not isinstance(limit, int):
        return str(count)
    return f"{count}/{limit}"


def elapsed_s(training: list[dict], progress: dict) -> float:
    """Seconds the run has trained, over every attempt of its training jobs (one still running counts to now)."""
    now, elapsed = time.time(), 0.0
    for job in training:
        for attempt in job.get("attempts", []):
            start = _number(attempt.get("started"))
            end = _number(attempt.get("ended"))
            if end is None:
                end = now if job.get("state") in runs.ACTIVE_STATES else _number(progress.get("updated", start))
            if start is not None and end is not None:
                elapsed += max(0.0, end - start)
    return elapsed


def eta_s(run_dir: Path, latest: dict, progress: dict) -> float | None:
    """Seconds left for a running run at its last throughput; None when that cannot be computed."""
    step, total, rate = progress.get("step"), progress.get("total_steps"), progress.get("samples_per_s")
    if step is None or not total or not rate:
        return None
    try:
        cfg = runs.read_job_dict(run_dir)
        world = (latest.get("attempts") or [{}])[-1].get("world_size") or 1
        global_batch = cfg["data"]["batch_size"] * cfg["train"]["grad_accum"] * world
        return (total - step) * global_batch / rate
    except (KeyError, TypeError, ValueError, ZeroDivisionError, runs.BrokenRunError):
        return None


def run_summary(run_dir: Path, data: dict) -> dict:
    """The figures of one run's row."""
    progress = runs.read_progress(run_dir) or {}
    jobs = data["jobs"]
    training = [j for j in jobs if not j.get("steps")]  # the jobs that train; chained steps (--then) come after
    latest = training[-1] if training else None
    state = str(latest.get("state", "?")) if latest else "NEW"
    if progress.get("state") == "done" and state not in runs.ACTIVE_STATES:
        state = "COMPLETED"
    elapsed = elapsed_s(training, progress)
    eta = eta_s(run_dir, latest, progress) if state == "RUNNING" else None
    best = progress.get("best_metric")
    return {
        "run": run_dir.name,
        "state": state,
        "jobs": ",".join(j["job_id"] for j in training if j.get("kind", "slurm") == "slurm")
        or ",".join(j["job_id"] for j in training[-1:]) or "-",
        "then": "; ".join(f"{j['steps']} {j.get('state', '?')}" for j in jobs if j.get("steps")) or "-",
        "step": step_cell(progress),
        "loss": fmt_number(progress.get("loss")),
        "tflops": fmt_number(progress.get("tflops")),  # per device, at the last log
        "mfu": f"{_number(progress['mfu']):.1%}" if _number(progress.get("mfu")) is not None else "-",  # GPUs with a known peak
        "best": f"{fmt_number(best)} ({progress.get('best_metric_name')})" if best is not None else "-",
        "requeues": requeue_count(run_dir, data),
        "elapsed": fmt_duration(elapsed if jobs else None),
        "eta": fmt_duration(eta),
    }


def broken_row(run_dir: Path) -> dict:
    """The row of a run whose own files cannot be read: ``BROKEN``; the reason is printed under the table."""
    return {key: "-" for key, _ in COLUMNS} | {"run": run_dir.name, "state": "BROKEN"}


COLUMNS = [("run", "RUN"), ("state", "STATE"), ("jobs", "SLURM JOBS"), ("step", "STEP"), ("loss", "LOSS"),
           ("tflops", "TFLOP/S"), ("mfu", "MFU"), ("best", "BEST"), ("requeues", "REQUEUES"), ("elapsed", "ELAPSED"), ("eta", "ETA"), ("then", "THEN")]


def runs_table(rows: list[dict]) -> Table:
    table = Table(title="lenstrain runs", header_style="bold")
    for key, title in COLUMNS:
        table.add_column(title, no_wrap=True, justify="right" if key in ("loss", "tflops", "mfu", "requeues", "elapsed", "eta")
                         else "left")
    for row in rows:
        style = STATE_STYLES.get(row["state"], "")
        table.add_row(*[f"[{style}]{row[k]}[/]" if k == "state" and style else row[k] for k, _ in COLUMNS])
    return table


def jobs_table(run_dir: Path, data: dict, sacct_ok: bool) -> Table:
    table = Table(title=f"jobs of {run_dir.name}", header_style="bold")
    for title in ("JOB", "KIND", "STATE", "ATTEMPT", "STARTED", "ENDED", "OUTCOME", "STEP", "WHERE"):
        table.add_column(title, no_wrap=True)
    for job in data["jobs"]:
        attempts = job.get("attempts") or [{}]
        for i, attempt in enumerate(attempts):
            kind = job.get("kind", "slurm") + (f" then {job['steps']}" if job.get("steps") else "")
            table.add_row(
                job["job_id"] if i == 0 else "",
                kind if i == 0 else "",
                job.get("state", "?") if i == 0 else "",
                str(attempt.get("restart_count", i) + 1) if attempt else "-",
                _clock(attempt.get("started")),
                _clock(attempt.get("ended")),
                attempt.get("outcome", "running" if attempt and i == len(attempts) - 1 else "-"),
                fmt_number(attempt.get("step")),
                attempt.get("nodes") or attempt.get("host") or "-",
            )
    return table


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def show_all(runs_dir: Path | None) -> int:
    """``launcher status``: one row per run under ``runs_dir``."""
    run_dirs = runs.list_runs(runs_dir)
    if not run_dirs:
        console().print(f"no runs in {runs_dir or runs.DEFAULT_RUNS_DIR}/ yet; submit one with "
                        "`python -m launcher submit jobs/JOB.yaml`")
        return 0
    out = console()
    details, broken = print_rows(out, run_dirs)
    sacct_note(out, details)
    return 0


def show_one(run_dir: Path) -> int:
    """``launcher status RUN``: its row, its jobs and attempts (with sacct's), its checkpoints; 1 when broken."""
    out = console()
    details, broken = print_rows(out, [run_dir])
    if broken:
        print(f"error: run {run_dir.name} is broken: {broken[0].split(': BROKEN: ', 1)[1]}", file=sys.stderr)
        return 1
    run_dir, data, sacct_ok = details[0]
    out.print(jobs_table(run_dir, data, sacct_ok))
    slurm_jobs = [j["job_id"] for j in data["jobs"] if j.get("kind", "slurm") == "slurm"]
    if sacct_ok and slurm_jobs:
        out.print("sacct (every attempt):")
        for jid in slurm_jobs:
            for row in sacct_attempts(jid):
                out.print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), highlight=False)
    from lenstrain.checkpointing.checkpoint import COMPLETE, list_checkpoints

    complete = [p.name for _, p in list_checkpoints(RunDir(run_dir).checkpoints) if (p / COMPLETE).is_file()]
    out.print(f"checkpoints: {', '.join(complete[-5:]) or 'none'}", highlight=False)
    out.print(f"run dir: {run_dir}", highlight=False)
    out.print(f"TensorBoard: tensorboard --logdir {RunDir(run_dir).tb}", highlight=False)
    sacct_note(out, details)
    return 0


def print_rows(out: Console, run_dirs: list[Path]) -> tuple[list[tuple[Path, dict, bool]], list[str]]:
    """The runs' table (a broken run's row says BROKEN, its reason under the table); the readable runs with
    their jobs and whether sacct answered, and the broken runs' lines."""
    rows, details, broken = [], [], []
    for run_dir in run_dirs:
        use_run_cluster(run_dir)
        try:
            data, sacct_ok = refresh_states(run_dir)
            rows.append(run_summary(run_dir, data))
        except runs.BrokenRunError as exc:  # one broken run does not hide the others
            rows.append(broken_row(run_dir))
            broken.append(f"{run_dir.name}: BROKEN: {exc}")
            continue
        details.append((run_dir, data, sacct_ok))
    out.print(runs_table(rows))
    for line in broken:
        out.print(line, highlight=False, soft_wrap=True)
    return details, broken


def sacct_note(out: Console, details: list[tuple[Path, dict, bool]]) -> None:
    if not any(ok for _, _, ok in details) and any(j.get("kind", "slurm") == "slurm" for _, d, _ in details
                                                    for j in d["jobs"]):
        out.print("[dim]sacct not reachable: SLURM states are the last ones recorded in jobs.json[/]")
