"""submitit glue: the sbatch parameters of a job, the rendered script, submission and sacct queries.

The sbatch script is rendered by submitit itself (``submitit.slurm.slurm._make_sbatch_string``, the
function ``SlurmExecutor`` uses), so ``--dry-run`` prints exactly what ``submit`` sends. The job runs
``nodes x tasks_per_node`` tasks with ``srun --kill-on-bad-exit=1``; each loads the pickled
:class:`launcher.entry.TrainTask` and trains. The preemption signal reaches the tasks
(``--signal=USR2@N``, no ``B:``) and the job is ``--requeue``-able: the entry requeues it itself after
a collective checkpoint, so submitit's own timeout counting never decides anything. When a task dies
or a collective fails, the batch script's teardown (:mod:`launcher.recovery`) requeues the job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.clusters import ClusterProfile
from launcher.sbatch_options import sbatch_parameters
from launcher.spec import JobSpec
from lenstrain.checkpointing.rundir import SUBMITIT_DIR

SLURM_TIMEOUT_S = 20
KILL_ON_BAD_EXIT = ["--kill-on-bad-exit=1"]


def use_profile_slurm_conf(profile: ClusterProfile) -> None:
    """Point SLURM's clients at the profile's slurm.conf, unless SLURM_CONF is set already."""
    path = profile.slurm_conf_path
    if path is not None and "SLURM_CONF" not in os.environ and path.is_file():
        os.environ["SLURM_CONF"] = str(path)


def slurm_problem() -> str | None:
    """None if a SLURM controller answers, else why not (for the user)."""
    missing = [tool for tool in ("sbatch", "srun", "sinfo", "sacct") if shutil.which(tool) is None]
    if missing:
        return f"SLURM's commands are not on PATH ({', '.join(missing)} missing)"
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        return f"SLURM_CONF={conf} does not exist"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {SLURM_TIMEOUT_S} s"
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF not set"
        return f"sinfo failed ({where}): {lines[-1] if lines else f'exit status {out.returncode}'}"
    return None


def teardown_lines(run_dir: Path, job_name: str, max_requeues: int) -> list[str]:
    """Batch-script lines after ``srun``: a failed step goes to :mod:`launcher.recovery`, which may requeue
    the job; the script still exits with ``srun``'s status."""
    recover = " ".join([python_command(), "-m launcher.recovery", shlex.quote(str(run_dir)), "--name",
                        shlex.quote(job_name), "--max-requeues", str(max_requeues), '--status "$status"'])
    return ["status=$?", f'[ "$status" -eq 0 ] || {recover}', 'exit "$status"']


def executor_parameters(spec: JobSpec, profile: ClusterProfile, job_name: str, run_dir: Path) -> dict:
    """Parameters for ``SlurmExecutor.update_parameters`` (submitit's own names)."""
    res = spec.resources
    params: dict = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "time": res.time_minutes,
        "signal_delay_s": res.signal_delay_s,
        "stderr_to_stdout": False,
        # submitit writes --signal from SUBMITIT_PREEMPT_SIGNAL at import; the profile decides here.
        "additional_parameters": {"signal": f"{profile.preempt_signal}@{res.signal_delay_s}", "requeue": True},
    }
    params.update(_optional_parameters(res, profile))
    if res.reservation:  # submitit has no parameter of its own for it
        params["additional_parameters"]["reservation"] = res.reservation
    # The profile's site options, then the job's (checked in launcher.sbatch_options): extra #SBATCH lines.
    params["additional_parameters"].update(sbatch_parameters({**profile.sbatch, **res.sbatch}))
    setup = list(dict.fromkeys([*profile.setup, *res.setup]))  # a line in both runs once
    if setup:
        params["setup"] = setup
    # One dead task stops the step at once; the batch script then decides about a requeue.
    params["srun_args"] = [*KILL_ON_BAD_EXIT, *profile.srun_args]
    params["teardown"] = teardown_lines(run_dir, job_name, res.max_requeues)
    check_script_values(params, run_dir, profile)
    return params


def _optional_parameters(res, profile: ClusterProfile) -> dict:
    """The job's (else the profile's) options that submitit has parameters for, where they are set."""
    optional = {
        "partition": res.partition or profile.partition,
        "account": res.account or profile.account,
        "qos": res.qos or profile.qos,
        "constraint": res.constraint,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{res.mem.upper().removesuffix('B')}" if res.mem else None,
        "gres": res.gres_line,
        "exclusive": res.exclusive or None,
        "exclude": res.exclude,
        "nodelist": res.nodelist,
        "mail_type": res.mail_type,
        "mail_user": res.mail_user,
        "comment": res.comment,
    }
    return {k: v for k, v in optional.items() if v is not None}


def check_script_values(params: dict, run_dir: Path, profile: ClusterProfile) -> None:
    """The last guard before the script is rendered: every string that reaches it is one line (the job's fields
    were validated where they entered; this covers the rest, the run directory included). Exit 2 naming the key."""
    from launcher.values import script_problems
    from lenstrain.config.schema import ConfigError

    where = {"job_name": "run name", "partition": "resources.partition", "account": "resources.account",
             "qos": "resources.qos", "constraint": "resources.constraint", "mem": "resources.mem",
             "setup": "resources.setup", "srun_args": f"cluster profile {profile.name}: srun_args",
             "teardown": "--run-dir", "folder": "--run-dir", "python": "the Python interpreter's path",
             "additional_parameters": "sbatch option"}
    problems = script_problems({**params, "folder": str(run_dir), "python": sys.executable}, where)
    if problems:
        raise ConfigError(problems=problems)


def python_command() -> str:
    return shlex.quote(sys.executable)


def submitit_command(folder: Path) -> str:
    """The command submitit puts after ``srun`` (see ``SlurmExecutor._submitit_command_str``)."""
    return " ".join([python_command(), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(spec: JobSpec, profile: ClusterProfile, run_dir: Path, job_name: str) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(run_dir) / SUBMITIT_DIR
    params = executor_parameters(spec, profile, job_name, run_dir)
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **params)


def submit(spec: JobSpec, profile: ClusterProfile, run_dir: Path, job_name: str, task) -> str:
    """Submit ``task`` (a picklable callable) as one SLURM job; returns its job id."""
    import submitit

    folder = Path(run_dir) / SUBMITIT_DIR
    executor = submitit.SlurmExecutor(
        folder=folder, max_num_timeout=spec.resources.max_requeues, python=python_command()
    )
    executor.update_parameters(**executor_parameters(spec, profile, job_name, run_dir))
    job = executor.submit(task)
    return str(job.job_id)


# -------------------------------------------------------------------------------------- queries


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def sacct_jobs(job_ids: list[str]) -> dict[str, dict] | None:
    """Latest state of each job (``sacct -X``): {id: {State, Elapsed, NodeList, Start, End}}; None if sacct fails."""
    if not job_ids or shutil.which("sacct") is None:
        return {} if job_ids == [] else None
    fields = ["JobID", "State", "Elapsed", "NodeList", "Start", "End", "Partition"]
    out = _run(["sacct", "-X", "-n", "-P", "-o", ",".join(fields), "-j", ",".join(job_ids)])
    if out is None:
        return None
    info: dict[str, dict] = {}
    for line in out.splitlines():
        row = dict(zip(fields, line.split("|"), strict=False))
        if row.get("JobID") in job_ids:
            row["State"] = row.get("State", "").split(" ")[0]  # "CANCELLED by 0" -> CANCELLED
            info[row["JobID"]] = row
    return info


def sacct_attempts(job_id: str) -> list[dict]:
    """Every attempt of one job, requeued ones included (``sacct -D``)."""
    fields = ["JobID", "State", "Start", "End", "Elapsed", "NodeList", "ExitCode"]
    out = _run(["sacct", "-X", "-D", "-n", "-P", "-o", ",".join(fields), "-j", str(job_id)])
    if out is None:
        return []
    return [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines() if line.strip()]


def squeue_state(job_id: str) -> str | None:
    """The controller's current state of a job (None when it does not know it)."""
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    if out is None:
        out = _run(["scontrol", "show", "job", str(job_id)])
        if out is None:
            return None
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return None
    state = out.strip().splitlines()
    return state[0] if state else None


def scancel(job_ids: list[str], signal: str | None = None) -> bool:
    cmd = ["scancel", *([f"--signal={signal}"] if signal else []), *job_ids]
    return _run(cmd) is not None


def partitions() -> list[str]:
    """The partitions the controller knows (empty if it cannot be asked)."""
    out = _run(["sinfo", "-h", "-o", "%P"])
    return sorted({p.strip().rstrip("*") for p in out.split()}) if out else []
