"""``launcher sweep FILE``: check the sweep and its trials' job, write the sweep directory and its study,
then print it (``--dry-run``), run ``parallel`` workers here (``--local``) or submit ONE SLURM job array
(``--array=0-(W-1)%parallel``) whose tasks are workers. ``resume SWEEP`` comes back here too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from launcher import local, runs
from launcher.clusters import ClusterProfile
from launcher.launch import print_dry_run_end
from launcher.lifecycle.conflict import holds_same
from launcher.lifecycle.processes import Children, cap_workers, describe_exit, live_jobs
from launcher.spec import JobSpec, check_job
from launcher.sweep.paths import SWEEP_FILE
from launcher.sweep.spec import BaseJob, SweepSpec
from launcher.sweep.study import (
    ask_lock,
    counts,
    create_study,
    open_study,
    read_sweep_dir,
    reap,
    write_sweep,
)
from lenstrain.checkpointing.rundir import LOGS_DIR, SUBMITIT_DIR
from lenstrain.config.schema import ConfigError
from lenstrain.run.preemption import EXIT_REQUEUE
from shards.clikit import UsageError

PREVIEW_TRIALS = 4


def workers(spec: SweepSpec) -> int:
    """W, the array's size: one worker per trial running at once, no more than there are trials."""
    return max(1, min(spec.parallel, spec.trials))


def trial_problems(job: JobSpec, profile: ClusterProfile | None, here: bool, manifest=None) -> list[tuple[str, str]]:
    """The base job's problems as each trial would meet them: on SLURM a trial has the base job's tasks
    (nodes x tasks_per_node, one array task); here it runs as one process. ``manifest``: its shard set's, loaded
    once already (None: loaded here)."""
    if here:
        return check_job(job, profile, world_size=1, manifest=manifest) + local.check_local(job, 1)
    return check_job(job, profile, manifest=manifest)


def check_sweep_dir(root: Path, spec: SweepSpec, job: dict) -> str:
    """``new`` or ``continue`` (the same sweep again: it goes on to its count); a different sweep is refused."""

    def difference() -> str | None:
        old_spec, old_job = read_sweep_dir(root)
        fixed = {k: v for k, v in job.items() if k != "resources"}
        if old_spec.model_dump(exclude={"parallel"}) == spec.model_dump(exclude={"parallel"}) and fixed == {
                k: v for k, v in old_job.items() if k != "resources"}:
            return None
        return (f"{root} holds a different sweep; choose another --name, or continue that one "
                f"with `python -m launcher resume {root.name}`")

    return "continue" if holds_same(root, SWEEP_FILE, difference, "sweep") else "new"


def tasks_per_trial(job: JobSpec) -> str:
    r = job.resources
    return "1 task" if r.world_size == 1 else f"{r.nodes} node(s) x {r.ntasks_per_node} task(s)"


def array_parameters(job: JobSpec, profile: ClusterProfile, root: Path, spec: SweepSpec) -> dict:
    """submitit's parameters for the array: the base job's (its teardown a run's, given the sweep's directory:
    :mod:`launcher.recovery` tells the two apart), and ``%parallel``."""
    from launcher.slurm import executor_parameters

    params = executor_parameters(job, profile, spec.name, root)
    params["array_parallelism"] = spec.parallel
    return params


def render_array(job: JobSpec, profile: ClusterProfile, root: Path, spec: SweepSpec) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    from launcher.slurm import submitit_command

    folder = root / SUBMITIT_DIR
    return _make_sbatch_string(
        command=submitit_command(folder),
        folder=folder,
        map_count=workers(spec),
        **array_parameters(job, profile, root, spec),
    )


def preview_trials(spec: SweepSpec, n: int) -> list[dict]:
    """The first ``n`` trials the sampler would propose (an in-memory study; nothing is written)."""
    import optuna

    from launcher.sweep.samplers import make_pruner, make_sampler

    sampler = make_sampler(
        spec.sampler, spec.seed, spec.sampler_options, spec.grid() if spec.sampler == "grid" else None
    )
    study = optuna.create_study(
        direction=spec.direction, sampler=sampler, pruner=make_pruner(spec.pruner, spec.pruner_options)
    )
    if spec.sampler == "grid":
        for params in spec.grid_points()[:n]:
            study.enqueue_trial(params)
    return [study.ask(spec.distributions()).params for _ in range(n)]


def print_dry_run(
    root: Path, spec: SweepSpec, job: JobSpec, profile, here: bool, problems, state: str
) -> None:
    print(
        f"# sweep {spec.name} -> {root} ({state}): {spec.trials} trials, {spec.parallel} at once, sampler "
        f"{spec.sampler}, pruner {spec.pruner}, {spec.direction} {spec.metric}"
    )
    if here:
        print(f"# local: {workers(spec)} worker process(es) of `python -m launcher.sweep.worker {root}`")
    elif profile is not None:
        print(f"# sbatch script -> {root / SUBMITIT_DIR}/%A_%a_submission.sh")
        print(render_array(job, profile, root, spec).rstrip())
    n = min(spec.trials, max(PREVIEW_TRIALS, spec.parallel))
    print(f"\n# the first {n} trials the {spec.sampler} sampler proposes (seed {spec.seed}):")
    for number, params in enumerate(preview_trials(spec, n)):
        print(f"#   trial {number}: " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    print_dry_run_end(problems, "this sweep")


def start(root: Path, spec: SweepSpec, base: BaseJob, args, state: str) -> int:
    """Check, then print, run here or submit the sweep in ``root`` (new, or continuing). ``base`` is the base job
    as read and validated once (by ``sweep FILE`` or ``resume``), with its shard set's manifest when it loaded."""
    job_spec, profile = base.spec, base.profile
    here = args.local or (profile is not None and profile.kind == "local")
    if here and state == "new" and (note := cap_workers(job_spec, workers(spec), "worker(s)")):
        print(f"[launcher] {note}")
    problems = base.problems + trial_problems(job_spec, profile, here, base.manifest)
    if args.dry_run:
        print_dry_run(root, spec, job_spec, profile, here, problems, state)
        return 0
    if problems:
        raise ConfigError(problems=problems)
    if not here:
        slurm_ready(profile)
    refuse_active(root)
    if state == "new":
        write_sweep(root, spec, job_spec.to_dict())
    create_study(root, spec)
    return run_local_workers(root, spec) if here else submit_array(root, spec, job_spec, profile)


def refuse_active(root: Path) -> None:
    from launcher.sweep.status import refresh_arrays

    if not runs.RunDir(root).jobs.is_file():
        return
    data = refresh_arrays(root)
    active = [j["job_id"] for j in runs.active_jobs(data) + live_jobs(data)]
    if active:
        raise UsageError(
            f"sweep {root.name} is active already (job {', '.join(active)}); watch it with "
            f"`python -m launcher status {root.name}`, stop it with `python -m launcher cancel {root.name}`"
        )


# ------------------------------------------------------------------------------------ SLURM


def slurm_ready(profile: ClusterProfile) -> None:
    """SLURM answers (before anything is written); else how to run the sweep here."""
    from launcher import slurm

    slurm.use_profile_slurm_conf(profile)
    problem = slurm.slurm_problem()
    if problem:
        raise UsageError(
            f"no SLURM cluster reachable: {problem}.\n  Run the sweep on this machine: add --local"
        )


def submit_array(root: Path, spec: SweepSpec, job: JobSpec, profile: ClusterProfile) -> int:
    import submitit

    from launcher import slurm
    from launcher.sweep.worker import SweepWorker

    executor = submitit.SlurmExecutor(
        folder=root / SUBMITIT_DIR, max_num_timeout=job.resources.max_requeues, python=slurm.python_command()
    )
    executor.update_parameters(**array_parameters(job, profile, root, spec))
    jobs = executor.map_array(SweepWorker(root), range(workers(spec)))
    array_id = str(jobs[0].job_id).split("_")[0]
    partition = job.resources.partition or profile.partition
    runs.add_job(
        root,
        array_id,
        kind="slurm",
        array=f"0-{workers(spec) - 1}%{spec.parallel}",
        cluster=profile.name,
        partition=partition,
        time_min=job.resources.time_minutes,
    )
    rel = runs.display_path(root)
    print(
        f"submitted sweep {spec.name} as SLURM job array {array_id} (--array=0-{workers(spec) - 1}%{spec.parallel}): "
        f"{spec.trials} trials of {tasks_per_trial(job)} each, partition {partition or '(default)'}, cluster {profile.name}"
    )
    print(f"  sweep dir:   {rel}")
    print(f"  status:      python -m launcher status {spec.name}")
    print(f"  report:      python -m launcher sweep report {spec.name}")
    print(f"  tensorboard: tensorboard --logdir {rel}")
    return 0


# ------------------------------------------------------------------------------------ local workers


def worker_gpus(n: int, environ: dict | None = None) -> list[str | None]:
    """The GPU each of ``n`` local workers gets (its ``CUDA_VISIBLE_DEVICES``), round robin over the GPUs this
    process may use; None for each on a machine without GPUs."""
    kind, count = local.local_devices()
    if kind != "cuda" or count == 0:
        return [None] * n
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else [str(i) for i in range(count)]
    return [ids[k % len(ids)] for k in range(n)]


def start_worker(root: Path, index: int, env: dict, workers_: Children, gpu: str | None = None) -> None:
    if gpu is not None:  # one GPU per worker: each trial's single process sees its own as cuda:0
        env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
    workers_.start(["launcher.sweep.worker", str(root), "--index", str(index)], env,
                   root / LOGS_DIR / f"worker-{index}.log", f"[worker {index}] ", append=True)


def register_workers(root: Path, spec: SweepSpec) -> tuple[str, dict]:
    """Record a local job of the sweep's workers in its ``jobs.json``; its id and the workers' environment."""
    n = workers(spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n))))
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    runs.add_job(root, job_id, kind="local", state="RUNNING", host=socket.gethostname(), pid=os.getpid(), workers=n)
    print(f"[launcher] sweep {spec.name}: {n} local worker(s), {spec.trials} trials; logs in {root / LOGS_DIR}",
          flush=True)
    return job_id, env


def run_local_workers(root: Path, spec: SweepSpec) -> int:
    """``parallel`` worker processes here; a worker that dies has its trial failed and is replaced (up to
    ``retries`` times per worker). Returns 0 once the study has its trials, else the first bad status."""
    job_id, env = register_workers(root, spec)
    pool = Children("worker(s)")
    gpus = worker_gpus(workers(spec))
    if gpus[0] is not None:
        print(f"[launcher] one GPU per worker: {', '.join(f'worker {k} -> GPU {g}' for k, g in enumerate(gpus))}")
    for index, gpu in enumerate(gpus):
        start_worker(root, index, env, pool, gpu)
    with pool.supervised():
        code = supervise(root, spec, env, pool, job_id, gpus)
    done = counts(open_study(root, spec))["done"] >= spec.trials
    state = "COMPLETED" if done else "STOPPED"
    runs.record_end(root, job_id, state=state, outcome="done" if done else "stopped")
    print(f"[launcher] sweep {spec.name}: {'done' if done else 'stopped'}; see `python -m launcher status "
          f"{runs.run_ref(root)}`", flush=True)
    return 0 if done else (code or EXIT_REQUEUE)


def supervise(root: Path, spec: SweepSpec, env: dict, pool: Children, job_id: str, gpus: list[str | None]) -> int:
    """Wait for the workers; reap and replace one that died (on its GPU). Returns the first abnormal status
    (0: none). ``gpus`` grows with the workers: the GPU of each."""
    runs.record_start(root, job_id, restart_count=0, host=socket.gethostname())
    seen: set[int] = set()
    first_bad, replaced = 0, 0
    while True:
        runs.update_jobs(root, lambda d: runs.find_job(d, job_id).update(worker_pids=pool.pids))
        for i, child in enumerate(pool.children):
            code = child.poll()
            if code is None or i in seen:
                continue
            seen.add(i)
            first_bad = first_bad or code
            if code in (0, EXIT_REQUEUE):
                continue
            if worker_died(root, spec, i, code) and replaced < spec.retries * workers(spec) and not stopping(pool):
                replaced += 1
                gpus.append(gpus[i])
                start_worker(root, len(pool.children), env, pool, gpus[i])
        if all(c.poll() is not None for c in pool.children) and len(seen) == len(pool.children):
            return first_bad
        time.sleep(0.2)


def worker_died(root: Path, spec: SweepSpec, index: int, code: int) -> bool:
    """Say so, reap its trial; whether the study still wants trials (then the worker is replaced)."""
    print(f"[launcher] worker {index} {describe_exit(code)}", flush=True)
    study = open_study(root, spec)
    with ask_lock(root):
        for line in reap(root, study, spec, slurm_ok=False):
            print(f"[launcher] {line}", flush=True)
    return counts(study)["done"] < spec.trials


def stopping(pool: Children) -> bool:
    """Whether a worker stopped on a signal (Ctrl-C, cancel): then the dead are not replaced."""
    return any(c.poll() == EXIT_REQUEUE for c in pool.children)
