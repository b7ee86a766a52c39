"""What ``submit`` and ``resume`` share: check the job once, for the ranks that will really run, then
print it (``--dry-run``), run it on this machine (``--local``) or submit it to SLURM.

The job was validated once when it was read (:func:`launcher.spec.read_job`); here it is checked
against the cluster and its shard set, written once to the run directory (``job.yaml`` and
``config.yaml``), and every task loads ``config.yaml`` from there. A dry run prints the script and the
resolved job even when those checks fail: their problems become warnings under the script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from launcher import local, runs
from launcher.clusters import ClusterProfile
from launcher.lifecycle.processes import cap_workers
from launcher.spec import JobSpec, job_check
from launcher.steps import parse_steps
from lenstrain.checkpointing.rundir import TB_DIR, RunDir
from lenstrain.config.schema import ConfigError
from shards.clikit import Problem, UsageError, format_problems

if TYPE_CHECKING:
    from lenstrain.run.preflight import MetaModel


@dataclass
class Launch:
    """One submission: the job, where its run lives, and how it runs."""

    spec: JobSpec
    profile: ClusterProfile | None
    name: str
    run_dir: Path
    job_ref: str  # how the user named the job file, for hints
    local: bool = False
    nproc: int | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    then: list[str] = field(default_factory=list)  # steps chained after training (launcher.steps)

    @property
    def world_size(self) -> int:
        return self.nproc if self.local and self.nproc else self.spec.resources.world_size


def plan(spec: JobSpec, profile: ClusterProfile | None, problems: list[Problem], name: str, run_dir: Path,
         args, job_ref: str) -> Launch:
    """Name the run, decide where it runs, and collect every problem of the job for those ranks."""
    try:
        spec.name = name
    except ValidationError as exc:
        raise UsageError(f"run name: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    job = Launch(spec, profile, name, run_dir, job_ref, problems=list(problems))
    job.then = parse_steps(getattr(args, "then", None))  # resume has no --then
    job.local = args.local or (profile is not None and profile.kind == "local")
    if job.local:
        job.nproc = args.nproc or local.default_nproc(spec)
        job.problems += local.check_local(spec, job.nproc)
        note = cap_workers(spec, job.nproc)
        if note:
            job.notes.append(note)
    checked = job_check(spec, profile, world_size=job.world_size)
    job.problems += checked.problems
    if not job.problems and checked.meta is not None:
        note = disk_space_note(checked.meta, run_dir)
        if note:
            job.notes.append(note)
    return job


def disk_space_note(meta: MetaModel, run_dir: Path) -> str | None:
    """A warning when the run directory has under about 2x one checkpoint's estimated size free; the estimate
    counts the model the preflight built on the meta device."""
    from lenstrain.checkpointing.space import estimate_meta_checkpoint_bytes, free_space_warning

    if meta.model is None:
        return (f"note: free space for checkpoints not checked: {meta.name} cannot be built on the meta device to "
                f"estimate their size ({meta.unbuildable or meta.problem})")
    return free_space_warning(run_dir, estimate_meta_checkpoint_bytes(meta.model))


def launch(job: Launch, dry_run: bool) -> int:
    if job.profile is None or (job.problems and not dry_run):
        raise ConfigError(problems=job.problems)
    if dry_run:
        print_dry_run(job, runs.check_run(job.run_dir, job.spec))
        return 0
    if is_complete(job, runs.check_run(job.run_dir, job.spec)):
        return then_after_complete(job)
    partition = None if job.local else check_slurm(job)
    with runs.run_lock(job.run_dir):  # from the check of the run directory to the new job's record
        state = runs.check_run(job.run_dir, job.spec)
        complete = is_complete(job, state)
        if not complete:
            if state == "resubmit":
                refuse_active(job)
            runs.write_run(job.run_dir, job.spec)
            if job.local:
                local_job = local.register_local(job.spec, job.run_dir, job.nproc)
            else:
                job_id = submit_slurm(job, partition)
    if complete:
        return then_after_complete(job)
    if job.local:
        return start_local(job, state, local_job)
    report_submitted(job, job_id, partition)
    return 0


def is_complete(job: Launch, state: str) -> bool:
    """Whether the run in ``job.run_dir`` has trained to its end (then it says so): nothing to train."""
    progress = (runs.read_progress(job.run_dir) or {}) if state == "resubmit" else {}
    if progress.get("state") != "done":
        return False
    what = "nothing to train" if job.then else "nothing to do"
    print(f"run {job.name} is complete (step {progress.get('step')}/{progress.get('total_steps')}) in "
          f"{job.run_dir}; {what}. Use --name NEW_NAME to train it again.")
    return True


def then_after_complete(job: Launch) -> int:
    """A complete run's chained steps (``--then``), if any: here, or as a SLURM job that starts at once."""
    if not job.then:
        return 0
    if job.local:
        return run_then_locally(job)
    check_slurm(job)
    return submit_then(job, None)


def run_then_locally(job: Launch) -> int:
    from launcher.steps import run_steps_locally

    print(f"[launcher] then: {', '.join(job.then)} of run {job.name}, here", flush=True)
    return run_steps_locally(job.run_dir, job.then)


def submit_then(job: Launch, after: str | None) -> int:
    """The chained steps as one SLURM job after the training job ``after`` (None: at once)."""
    from launcher.steps import submit_steps

    step_id = submit_steps(job.spec, job.profile, job.run_dir, job.name, job.then, after)
    when = f"after job {after} completes (afterok)" if after else "now: training is complete"
    print(f"  then:        {','.join(job.then)} as SLURM job {step_id}, {when}")
    return 0


def print_dry_run(job: Launch, state: str) -> None:
    from launcher import slurm

    print(f"# resolved job -> {RunDir(job.run_dir).job} ({state} run)")
    print(job.spec.to_yaml().rstrip())
    print()
    for note in job.notes:
        print(f"# {note}")
    if job.local:
        print(f"# local run: {job.nproc} process(es) of `python -m launcher.entry {job.run_dir}` "
              f"with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set")
    else:
        print(f"# sbatch script -> {RunDir(job.run_dir).submitit}/%j_submission.sh")
        print(slurm.render_sbatch(job.spec, job.profile, job.run_dir, job.name).rstrip())
    if job.then:
        where = "here, in turn, once training completes" if job.local else \
            "as one SLURM job after training (--dependency=afterok:JOBID --kill-on-invalid-dep=yes)"
        print(f"\n# then: {', '.join(job.then)} {where}")
    print_dry_run_end(job.problems, "this job")


def print_dry_run_end(problems: list[Problem], what: str) -> None:
    """A dry run's last lines: the problems that would stop the submission, as comments, and that nothing went."""
    if problems:
        header = f"warning: submitting {what} would stop at {len(problems)} problem(s)"
        print("\n" + "\n".join(f"# {line}" for line in format_problems(problems, header).splitlines()))
    print("\n# dry run: nothing submitted")


def _resumes(run_dir: Path) -> str:
    newest = runs.newest_checkpoint(run_dir)
    return f"; resumes from {newest.name}" if newest else ""


def refuse_active(job: Launch) -> None:
    """A run with a job still queued or running (on SLURM, or ranks here) is not started twice."""
    from launcher.status import refresh_states

    data, _ = refresh_states(job.run_dir)
    active = [f"{j['job_id']} ({j['state']})" for j in runs.active_jobs(data) + local.live_jobs(data)]
    if active:
        raise UsageError(f"run {job.name} is active already (job {', '.join(active)}).\n"
                         f"  Watch it: python -m launcher status {job.name}; stop it: python -m launcher cancel "
                         f"{job.name}")


def start_local(job: Launch, state: str, local_job=None) -> int:
    """Train ``job`` here; ``local_job`` is its record in jobs.json, made here (under the run lock) if not given."""
    if local_job is None:
        with runs.run_lock(job.run_dir):
            if state == "resubmit":
                refuse_active(job)
            runs.write_run(job.run_dir, job.spec)
            local_job = local.register_local(job.spec, job.run_dir, job.nproc)
    for note in job.notes:
        print(f"[launcher] {note}")
    print(f"[launcher] {'resubmitting' if state == 'resubmit' else 'starting'} run {job.name} locally in "
          f"{job.run_dir}{_resumes(job.run_dir)}", flush=True)
    code = local.run_local(job.spec, job.run_dir, job.nproc, job.name, local_job)
    if code == 0 and job.then:
        return run_then_locally(job)
    return code


def _no_slurm_hint(problem: str, job_ref: str) -> str:
    return (
        f"no SLURM cluster reachable: {problem}.\n"
        f"  Try the job on this machine:   python -m launcher submit {job_ref} --local\n"
        f"  Or start the development cluster and point SLURM's commands at it:\n"
        f"    slurm/devcluster up && eval \"$(slurm/devcluster env)\""
    )


def check_slurm(job: Launch) -> str | None:
    """SLURM answers and knows the partition; returns the partition (None: the cluster's default)."""
    from launcher import slurm

    slurm.use_profile_slurm_conf(job.profile)
    problem = slurm.slurm_problem()
    if problem:
        raise UsageError(_no_slurm_hint(problem, job.job_ref))
    partition = job.spec.resources.partition or job.profile.partition
    known = slurm.partitions()
    if partition and known and partition not in known:
        raise ConfigError(problems=[("resources.partition",
                                     f"unknown partition {partition!r}; valid choices: {', '.join(known)}")])
    return partition


def submit_slurm(job: Launch, partition: str | None) -> str:
    """Submit the job (the run lock held) and record it in jobs.json; returns its SLURM job id."""
    from launcher import slurm
    from launcher.entry import TrainTask

    res = job.spec.resources
    task = TrainTask(job.run_dir, max_requeues=res.max_requeues, name=job.name)
    job_id = slurm.submit(job.spec, job.profile, job.run_dir, job.name, task)
    runs.add_job(job.run_dir, job_id, kind="slurm", cluster=job.profile.name, partition=partition,
                 nodes=res.nodes, tasks_per_node=res.ntasks_per_node, time_min=res.time_minutes)
    return job_id


def report_submitted(job: Launch, job_id: str, partition: str | None) -> None:
    res = job.spec.resources
    rel = runs.display_path(job.run_dir)
    print(f"submitted run {job.name} as SLURM job {job_id}: {res.nodes} node(s) x {res.ntasks_per_node} task(s), "
          f"partition {partition or '(default)'}, {res.time_minutes} min, cluster {job.profile.name}"
          f"{_resumes(job.run_dir)}")
    print(f"  run dir:     {rel}")
    print(f"  status:      python -m launcher status {job.name}")
    print(f"  logs:        python -m launcher logs {job.name} --follow")
    print(f"  tensorboard: tensorboard --logdir {rel}/{TB_DIR}")
    if job.then:
        submit_then(job, job_id)
    for note in job.notes:
        print(f"[launcher] {note}")
