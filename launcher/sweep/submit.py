"""``launcher sweep FILE``: check the sweep and its trials' job, write the sweep directory and its study,
then print it (``--dry-run``), run ``parallel`` workers here (``--local``) or submit ONE SLURM job array
(``--array=0-(W-1)%parallel``) whose tasks are workers. ``resume SWEEP`` comes back here too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher import local, runs
from launcher.clusters import ClusterProfile
from launcher.spec import JobSpec, check_job, read_job
from launcher.sweep.spec import SweepSpec
from launcher.sweep.study import (
    SweepDir,
    counts,
    create_study,
    is_sweep,
    open_study,
    read_sweep_dir,
    reap,
    write_sweep,
)
from lenstrain.checkpointing.rundir import LOGS_DIR, SUBMITIT_DIR
from lenstrain.config.schema import ConfigError
from lenstrain.run.preemption import EXIT_REQUEUE
from shards.clikit import UsageError, format_problems

PREVIEW_TRIALS = 4


def workers(spec: SweepSpec) -> int:
    """W, the array's size: one worker per trial running at once, no more than there are trials."""
    return max(1, min(spec.parallel, spec.trials))


def trial_problems(job: JobSpec, profile: ClusterProfile | None, here: bool) -> list[tuple[str, str]]:
    """The base job's problems as each trial would meet them: on SLURM a trial has the base job's tasks
    (nodes x tasks_per_node, one array task); here it runs as one process."""
    if here:
        return check_job(job, profile, world_size=1) + local.check_local(job, 1)
    return check_job(job, profile)


def check_sweep_dir(root: Path, spec: SweepSpec, job: dict) -> str:
    """``new`` or ``continue`` (the same sweep again: it goes on to its count); a different sweep is refused."""
    if is_sweep(root):
        old_spec, old_job = read_sweep_dir(root)
        same = old_spec.model_dump(exclude={"parallel"}) == spec.model_dump(exclude={"parallel"}) and {
            k: v for k, v in old_job.items() if k != "resources"
        } == {k: v for k, v in job.items() if k != "resources"}
        if not same:
            raise runs.RunConflict(
                f"{root} holds a different sweep; choose another --name, or continue that one "
                f"with `python -m launcher resume {root.name}`"
            )
        return "continue"
    if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
        raise runs.RunConflict(
            f"{root} exists and is not a sweep directory; choose another --name or --run-dir"
        )
    return "new"


def tasks_per_trial(job: JobSpec) -> str:
    r = job.resources
    return "1 task" if r.world_size == 1 else f"{r.nodes} node(s) x {r.ntasks_per_node} task(s)"


def array_parameters(job: JobSpec, profile: ClusterProfile, root: Path, spec: SweepSpec) -> dict:
    """submitit's parameters for the array: the base job's, ``%parallel``, and the sweep's own teardown."""
    from launcher.slurm import executor_parameters, python_command

    params = executor_parameters(job, profile, spec.name, root)
    recover = f'{python_command()} -m launcher.sweep.recover {root} --status "$status"'
    params["teardown"] = ["status=$?", f'[ "$status" -eq 0 ] || {recover}', 'exit "$status"']
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
    if problems:
        header = f"warning: submitting this sweep would stop at {len(problems)} problem(s)"
        print("\n" + "\n".join(f"# {line}" for line in format_problems(problems, header).splitlines()))
    print("\n# dry run: nothing submitted")


def cap_local_workers(job: dict, n: int) -> str | None:
    cap = max(0, (os.cpu_count() or 1) // n)
    if job["data"]["workers"] <= cap:
        return None
    note = f"data.workers {job['data']['workers']} -> {cap}: this machine has {os.cpu_count()} CPU(s) for {n} worker(s)"
    job["data"]["workers"] = cap
    return note


def start(root: Path, spec: SweepSpec, job: dict, args, state: str) -> int:
    """Check, then print, run here or submit the sweep in ``root`` (new, or continuing)."""
    job_spec, profile, problems = read_job(job)
    here = args.local or (profile is not None and profile.kind == "local")
    if here and state == "new" and (note := cap_local_workers(job, workers(spec))):
        print(f"[launcher] {note}")
        job_spec, profile, problems = read_job(job)
    problems = problems + trial_problems(job_spec, profile, here)
    if args.dry_run:
        print_dry_run(root, spec, job_spec, profile, here, problems, state)
        return 0
    if problems:
        raise ConfigError(problems=problems)
    if not here:
        slurm_ready(profile)
    refuse_active(root)
    if state == "new":
        write_sweep(root, spec, job)
    create_study(root, spec)
    return run_local_workers(root, spec) if here else submit_array(root, spec, job_spec, profile)


def refuse_active(root: Path) -> None:
    from launcher.sweep.status import refresh_arrays

    if not runs.RunDir(root).jobs.is_file():
        return
    data = refresh_arrays(root)
    active = [j["job_id"] for j in runs.active_jobs(data)] + [j["job_id"] for j in live_local(data)]
    if active:
        raise UsageError(
            f"sweep {root.name} is active already (job {', '.join(active)}); watch it with "
            f"`python -m launcher status {root.name}`, stop it with `python -m launcher cancel {root.name}`"
        )


def live_local(data: dict) -> list[dict]:
    from launcher.sweep.study import local_worker_alive

    return [
        j
        for j in data["jobs"]
        if j.get("kind") == "local"
        and j.get("host") == socket.gethostname()
        and any(local_worker_alive(pid) for pid in j.get("worker_pids", []))
    ]


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


def start_worker(root: Path, index: int, env: dict, ranks: local.Ranks, gpu: str | None = None) -> None:
    if gpu is not None:  # one GPU per worker: each trial's single process sees its own as cuda:0
        env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
    log_dir = root / LOGS_DIR
    log_dir.mkdir(exist_ok=True)
    log = open(log_dir / f"worker-{index}.log", "a")  # noqa: SIM115 - closed by Ranks.close
    ranks.logs.append(log)
    child = subprocess.Popen(
        [sys.executable, "-u", "-m", "launcher.sweep.worker", str(root), "--index", str(index)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ranks.children.append(child)
    pump = threading.Thread(
        target=local._pump,
        args=(child.stdout, [(sys.stdout, True), (log, False)], f"[worker {index}] "),
        daemon=True,
    )
    pump.start()
    ranks.pumps.append(pump)


def run_local_workers(root: Path, spec: SweepSpec) -> int:
    """``parallel`` worker processes here; a worker that dies has its trial failed and is replaced (up to
    ``retries`` times per worker). Returns 0 once the study has its trials, else the first bad status."""
    import signal

    n = workers(spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n))),
    )
    job_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    runs.add_job(
        root, job_id, kind="local", state="RUNNING", host=socket.gethostname(), pid=os.getpid(), workers=n
    )
    print(
        f"[launcher] sweep {spec.name}: {n} local worker(s), {spec.trials} trials; logs in {root / LOGS_DIR}",
        flush=True,
    )
    ranks = local.Ranks()
    gpus = worker_gpus(n)
    if gpus[0] is not None:
        print(f"[launcher] one GPU per worker: {', '.join(f'worker {k} -> GPU {g}' for k, g in enumerate(gpus))}")
    for index in range(n):
        start_worker(root, index, env, ranks, gpus[index])
    previous = {
        sig: signal.signal(sig, local._forwarder(ranks))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    }
    try:
        code = supervise(root, spec, env, ranks, job_id, gpus)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ranks.close()
    done = counts(open_study(root, spec))["done"] >= spec.trials
    runs.record_end(
        root, job_id, state="COMPLETED" if done else "STOPPED", outcome="done" if done else "stopped"
    )
    runs.update_jobs(
        root, lambda d: runs.find_job(d, job_id).update(state="COMPLETED" if done else "STOPPED")
    )
    print(
        f"[launcher] sweep {spec.name}: {'done' if done else 'stopped'}; see `python -m launcher status "
        f"{runs.run_ref(root)}`",
        flush=True,
    )
    return 0 if done else (code or EXIT_REQUEUE)


def supervise(
    root: Path, spec: SweepSpec, env: dict, ranks: local.Ranks, job_id: str, gpus: list[str | None]
) -> int:
    """Wait for the workers; reap and replace one that died (on its GPU). Returns the first abnormal status
    (0: none). ``gpus`` grows with the workers: the GPU of each."""
    from launcher.sweep.study import ask_lock

    runs.record_start(root, job_id, restart_count=0, host=socket.gethostname())
    seen: set[int] = set()
    first_bad, replaced = 0, 0
    while True:
        runs.update_jobs(
            root, lambda d: runs.find_job(d, job_id).update(worker_pids=[c.pid for c in ranks.children])
        )
        for i, child in enumerate(ranks.children):
            code = child.poll()
            if code is None or i in seen:
                continue
            seen.add(i)
            if code in (0, EXIT_REQUEUE):
                first_bad = first_bad or (code if code else 0)
                continue
            print(f"[launcher] worker {i} {local.describe_exit(code)}", flush=True)
            study = open_study(root, spec)
            with ask_lock(root):
                for line in reap(root, study, spec, slurm_ok=False):
                    print(f"[launcher] {line}", flush=True)
            first_bad = first_bad or code
            if (
                replaced < spec.retries * workers(spec)
                and counts(study)["done"] < spec.trials
                and not stopping(ranks)
            ):
                replaced += 1
                gpus.append(gpus[i])
                start_worker(root, len(ranks.children), env, ranks, gpus[i])
        if all(c.poll() is not None for c in ranks.children) and len(seen) == len(ranks.children):
            return first_bad
        time.sleep(0.2)


def stopping(ranks: local.Ranks) -> bool:
    """Whether a worker stopped on a signal (Ctrl-C, cancel): then the dead are not replaced."""
    return any(c.poll() == EXIT_REQUEUE for c in ranks.children)


def trial_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("trial-*") if p.is_dir())


__all__ = ["start", "SweepDir"]
