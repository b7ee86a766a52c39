"""Steps chained after training: ``launcher submit JOB --then eval,export``.

On SLURM each chained step list is one more job that depends on the training job (``--dependency=afterok:ID``,
``--kill-on-invalid-dep=yes``: it starts only when training completed, and is removed when training failed or
was cancelled). It runs one task on one node of the training job's partition and account (one GPU when
training had GPUs). With ``--local`` the steps run here, in turn, once training has completed.

- ``eval``: ``lenstrain eval RUN --split test`` with the best checkpoint: ``RUN/eval/test/metrics.json``,
  the plot and ``predictions.csv``;
- ``export``: ``lenstrain export RUN --best --out RUN/export/model.safetensors`` (and ``model.json``).

Each step job is recorded in the run's ``jobs.json`` with ``steps`` and ``after`` (the training job), and
``launcher status RUN`` shows it.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from launcher import runs
from shards.clikit import UsageError

EXPORT_FILE = Path("export") / "model.safetensors"


def _eval(run_dir: Path) -> int:
    from lenstrain.evaluation.evaluate import main_eval

    return main_eval(argparse.Namespace(run=run_dir, split="test", checkpoint="best", shards=None, tta=None))


def _export(run_dir: Path) -> int:
    from lenstrain.evaluation.export import export_run

    export_run(run_dir, run_dir / EXPORT_FILE, best=True)
    return 0


STEPS = {"eval": _eval, "export": _export}


def parse_steps(text: str | None) -> list[str]:
    """``eval,export`` -> ``["eval", "export"]``; a usage error names the valid steps."""
    if not text:
        return []
    steps = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise UsageError(f"--then {text!r}: unknown step(s) {', '.join(bad) or '(none)'}; valid: {', '.join(STEPS)}")
    return list(dict.fromkeys(steps))


def run_steps(run_dir: Path, steps: list[str]) -> int:
    """Run ``steps`` on the finished run in ``run_dir``, in turn; the first non-zero status stops them."""
    for step in steps:
        print(f"[launcher] {time.strftime('%H:%M:%S')} step {step} of run {Path(run_dir).name}", flush=True)
        code = STEPS[step](Path(run_dir))
        if code:
            return code
    return 0


class StepTask:
    """The picklable callable of a chained-steps job (one task): runs the steps and records them."""

    def __init__(self, run_dir: str | Path, steps: list[str], job_id: str | None = None) -> None:
        self.run_dir = str(run_dir)
        self.steps = list(steps)
        self.job_id = job_id  # None: the SLURM job's own id

    def __call__(self) -> dict:
        run_dir = Path(self.run_dir)
        job_id = self.job_id or os.environ.get("SLURM_JOB_ID", f"local-{os.getpid()}")
        runs.record_start(run_dir, job_id, restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                          host=socket.gethostname())
        try:
            code = run_steps(run_dir, self.steps)
        except Exception as exc:
            runs.record_end(run_dir, job_id, state="FAILED", outcome=f"failed: {type(exc).__name__}", exit=1)
            raise
        state, outcome = ("COMPLETED", "completed") if code == 0 else ("FAILED", f"exit {code}")
        runs.record_end(run_dir, job_id, state=state, outcome=outcome, exit=code)
        if code:
            raise RuntimeError(f"steps {','.join(self.steps)} of {run_dir.name} stopped with status {code}")
        return {"run_dir": self.run_dir, "steps": self.steps}


def step_parameters(spec, profile, name: str, after: str | None) -> dict:
    """submitit parameters of the steps job: one task, after ``after`` completed (None: no dependency)."""
    res = spec.resources
    params: dict = {
        "job_name": f"{name}-then",
        "nodes": 1,
        "ntasks_per_node": 1,
        "time": min(res.time_minutes, 120),
        "stderr_to_stdout": False,
        "additional_parameters": {},
    }
    if after:
        params["dependency"] = f"afterok:{after}"
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    optional = {
        "partition": res.partition or profile.partition,
        "account": res.account or profile.account,
        "qos": res.qos or profile.qos,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{res.mem.upper().removesuffix('B')}" if res.mem else None,
        "gres": "gpu:1" if res.gpus_per_node else None,
        "constraint": res.constraint,
        "reservation": res.reservation,
    }
    reservation = optional.pop("reservation")
    if reservation:
        params["additional_parameters"]["reservation"] = reservation
    params.update({k: v for k, v in optional.items() if v is not None})
    setup = list(dict.fromkeys([*profile.setup, *res.setup]))
    if setup:
        params["setup"] = setup
    return params


def submit_steps(spec, profile, run_dir: Path, name: str, steps: list[str], after: str | None) -> str:
    """Submit the steps as one SLURM job after ``after``; record it in ``jobs.json``; return its id."""
    import submitit

    from launcher import slurm
    from lenstrain.checkpointing.rundir import SUBMITIT_DIR

    executor = submitit.SlurmExecutor(folder=Path(run_dir) / SUBMITIT_DIR, max_num_timeout=0,
                                      python=slurm.python_command())
    executor.update_parameters(**step_parameters(spec, profile, name, after))
    job_id = str(executor.submit(StepTask(run_dir, steps)).job_id)
    runs.add_job(run_dir, job_id, kind="slurm", steps=",".join(steps), after=after, cluster=profile.name)
    return job_id


def run_steps_locally(run_dir: Path, steps: list[str]) -> int:
    """``--local``: the steps here, recorded in ``jobs.json`` as a local job."""
    job_id = f"local-then-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    runs.add_job(run_dir, job_id, kind="local", steps=",".join(steps), state="RUNNING", host=socket.gethostname(),
                 pid=os.getpid())
    try:
        StepTask(run_dir, steps, job_id)()
        return 0
    except Exception as exc:  # noqa: BLE001 - said in one line; the status is the command's
        print(f"error: {exc}", flush=True)
        return 1
