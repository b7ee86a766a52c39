"""``launcher status SWEEP``: the array jobs, a table of trials (number, state, parameters, metric, step, where
it was pruned) and the best trial so far. Reaps first: a trial whose worker is gone does not stay RUNNING."""

from __future__ import annotations

from pathlib import Path

from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from launcher import runs
from launcher.status import fmt_number, step_cell
from launcher.sweep.spec import SweepSpec
from launcher.sweep.study import SweepDir, ask_lock, counts, open_study, read_sweep_dir, reap

TRIAL_STYLES = {
    "COMPLETE": "bold green",
    "PRUNED": "yellow",
    "FAIL": "red",
    "RUNNING": "green",
    "WAITING": "dim",
}


def trial_row(root: Path, trial: FrozenTrial, spec: SweepSpec) -> list[str]:
    step = step_cell(runs.read_progress(SweepDir(root).trial(trial.number)) or {})
    pruned = (
        max(trial.intermediate_values)
        if trial.state == TrialState.PRUNED and trial.intermediate_values
        else None
    )
    note = trial.user_attrs.get("fail_reason", "")
    if trial.user_attrs.get("retry"):
        note = f"retry {trial.user_attrs['retry']} of trial {trial.user_attrs.get('retry_of')}" + (
            f"; {note}" if note else ""
        )
    if trial.user_attrs.get("orphaned"):
        note = "waiting for a worker to resume it"
    return [
        str(trial.number),
        trial.state.name,
        *[fmt_number(trial.params.get(k)) for k in spec.space],
        fmt_number(trial.value),
        step,
        fmt_number(pruned),
        note[:60],
    ]


def trials_table(root: Path, study, spec: SweepSpec) -> Table:
    table = Table(title=f"trials of sweep {root.name} ({spec.direction} {spec.metric})", header_style="bold")
    for title in ("#", "STATE", *spec.space, spec.metric, "STEP", "PRUNED AT", "NOTE"):
        table.add_column(title, no_wrap=True)
    for trial in study.get_trials(deepcopy=False):
        row = trial_row(root, trial, spec)
        style = TRIAL_STYLES.get(row[1])
        row[1] = f"[{style}]{row[1]}[/]" if style else row[1]
        table.add_row(*row)
    return table


def best_line(study, spec: SweepSpec) -> str:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return "best: no complete trial yet"
    best = study.best_trial
    params = ", ".join(f"{k}={v!r}" for k, v in best.params.items())
    return f"best: trial {best.number}, {spec.metric} {best.value:.6g} ({params})"


def array_state(job_id: str) -> str | None:
    """One state for a job array from its tasks' (sacct): RUNNING or PENDING while any task is active, else
    COMPLETED when all completed, else the first other end state; None when sacct does not know it."""
    from launcher.slurm import _run

    out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id])
    states = [
        line.split("|")[1].split(" ")[0] for line in (out or "").splitlines() if line.startswith(f"{job_id}_")
    ]
    if not states:
        return None
    active = [s for s in states if s in runs.ACTIVE_STATES]
    if active:
        return "RUNNING" if "RUNNING" in active else active[0]
    return next((s for s in states if s != "COMPLETED"), "COMPLETED")


def refresh_arrays(root: Path) -> dict:
    """The sweep's ``jobs.json`` with each array's state refreshed from its tasks."""
    data = runs.read_jobs(root, set_aside=True)
    states = {
        j["job_id"]: array_state(j["job_id"]) for j in data["jobs"] if j.get("kind", "slurm") == "slurm"
    }
    states = {k: v for k, v in states.items() if v}
    if states:
        runs.set_states(root, states)
    return runs.read_jobs(root, set_aside=True)


def show(root: Path, out) -> int:
    from launcher.status import jobs_table, use_job_cluster

    spec, job = read_sweep_dir(root)
    use_job_cluster(job, root)
    data = refresh_arrays(root)
    study = open_study(root, spec)
    with ask_lock(root):
        said = reap(root, study, spec)
    for line in said:
        out.print(f"[launcher] {line}", highlight=False)
    out.print(jobs_table(root, data, True))
    out.print(trials_table(root, study, spec))
    count = counts(study)
    states = {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    summary = ", ".join(f"{n} {s}" for s, n in states.items() if n)
    out.print(f"{count['done']}/{spec.trials} trials done ({summary or 'none yet'})", highlight=False)
    out.print(best_line(study, spec), highlight=False)
    out.print(f"sweep dir: {root}", highlight=False)
    out.print(f"report: python -m launcher sweep report {runs.run_ref(root)}", highlight=False)
    out.print(f"TensorBoard: tensorboard --logdir {root}", highlight=False)
    return 0
