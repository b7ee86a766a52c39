"""One sweep worker (a SLURM array task, or a local process): claim a trial, train it as an ordinary run in
``runs/SWEEP/trial-NNNN/``, tell the study how it ended, claim the next, until the study has its ``trials``.

A trial trains through :class:`launcher.entry.TrainTask`, exactly as a submitted run does: a preemption
or time limit checkpoints and requeues this array task, which on restart adopts the same trial (its
owner is this job id) and resumes it from its run directory. Each validation reaches the trial through
:mod:`lenstrain.run.hooks`: the value is reported at its step (a step already reported by an earlier attempt
is not reported again) and the study's pruner decides whether the run stops there (exit 46: PRUNED).

A base job with several tasks (nodes x tasks_per_node) makes each array task that many SLURM tasks: the
first leads (claims, reports, tells), the others follow its orders (:mod:`launcher.sweep.orders`), and each
trial trains as one multi-rank run.

``python -m launcher.sweep.worker SWEEP_DIR --index K`` is one local worker (``sweep --local``).
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from launcher import runs
from launcher.sweep.orders import DONE as ORDER_DONE
from launcher.sweep.orders import TRAIN, Orders, task_count, task_rank, use_trial_port
from launcher.sweep.spec import SweepSpec, with_params
from launcher.sweep.study import (
    DONE,
    WAIT,
    SweepDir,
    ask_lock,
    claim,
    disown,
    open_study,
    read_sweep_dir,
    this_owner,
)
from lenstrain.checkpointing.checkpoint import read_meta
from lenstrain.checkpointing.rundir import JOB_FILE
from lenstrain.run import hooks
from lenstrain.run.preemption import EXIT_REQUEUE, PreemptionFlag

if TYPE_CHECKING:
    from launcher.entry import TrainTask

POLL_S = 2.0  # how often a worker with nothing to claim looks again (others' trials may fail and come back)


def _say(message: str) -> None:
    print(f"[sweep] {time.strftime('%H:%M:%S')} {message}", flush=True)


class Reporter:
    """The report hook of one trial: report each validation's metric at its step, and ask the pruner."""

    def __init__(self, study: optuna.Study, trial: FrozenTrial, metric: str):
        self.trial = optuna.trial.Trial(study, trial._trial_id)
        self.metric = metric
        self.reported = set(trial.intermediate_values)  # by an earlier attempt of this trial
        self.pruned_at: int | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        if not math.isfinite(value):  # diverged: no value to report, and nothing to wait for
            self.pruned_at = step
            return True
        if step not in self.reported:
            self.trial.report(value, step)
            self.reported.add(step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


def trial_job(sweep_root: Path, job: dict, trial: FrozenTrial):
    """The trial's job: the base job with the trial's parameters, named after the sweep and trial."""
    from launcher.spec import read_job

    spec, _, _ = read_job(with_params(job, trial.params))
    spec.name = f"{sweep_root.name}-trial-{trial.number:04d}"
    return spec


def prepare_run(sweep_root: Path, job: dict, trial: FrozenTrial, owner: dict) -> Path:
    """The trial's run directory (written once) with this worker's job recorded in its ``jobs.json``."""
    run_dir = SweepDir(sweep_root).trial(trial.number)
    if not (run_dir / JOB_FILE).is_file():
        runs.write_run(run_dir, trial_job(sweep_root, job, trial))
    job_id = owner.get("job") or os.environ.setdefault(
        "LENSTRAIN_JOB_ID", f"local-{owner['host']}-{owner['pid']}"
    )
    if runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) is None:
        info = (
            {"array": owner.get("array")}
            if owner["kind"] == "slurm"
            else {"host": owner["host"], "pid": owner["pid"]}
        )
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        runs.add_job(
            run_dir,
            job_id,
            kind=owner["kind"],
            state="RUNNING",
            sweep_worker=owner.get("worker"),
            restart_offset=restart,
            **info,
        )
    return run_dir


def trial_task(run_dir: Path, job: dict) -> TrainTask:
    """The trial's training task, counting only the requeues of its array task since this trial began there
    (the array task's own restart count grows with every trial it runs)."""
    from launcher.entry import TrainTask

    job_id = os.environ.get("LENSTRAIN_JOB_ID") or os.environ.get("SLURM_JOB_ID", "")
    entry = runs.find_job(runs.read_jobs(run_dir, set_aside=True), job_id) or {}
    return TrainTask(
        run_dir,
        max_requeues=job["resources"]["max_requeues"],
        name=run_dir.name,
        restart_offset=int(entry.get("restart_offset", 0)),
    )


def trial_value(run_dir: Path, metric: str) -> tuple[float | None, int | None]:
    """The trial's value and the step it was measured at: ``metric`` as recorded (by the validation at that
    step) with the checkpoint ``python -m lenstrain eval RUN`` loads by default, the best by the run's
    ``checkpoint.best_metric``, else the newest. So the study's best is the best trial's own ``eval`` metric
    on the validation split, and the model ``eval``, ``predict`` and ``export --best`` use."""
    from lenstrain.evaluation.evaluate import choose_checkpoint
    from shards.clikit import UsageError

    cfg = runs.load_training_config(run_dir)
    try:
        path, _ = choose_checkpoint(
            run_dir, "best", cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, log=_say
        )
    except UsageError:
        return None, None
    meta = read_meta(path)
    value = (meta.get("metrics") or {}).get(metric)
    if value is None and meta.get("last_metrics_step") == meta["step"]:
        value = (meta.get("last_metrics") or {}).get(metric)
    finite = value is not None and math.isfinite(value)
    return (float(value) if finite else None), meta["step"]


def tell(
    study: optuna.Study,
    number: int,
    state: TrialState,
    value: float | None = None,
    why: str = "",
    attrs: dict[str, Any] | None = None,
) -> None:
    """End the trial: its user ``attrs`` (and for a FAIL, why), then its state and value."""
    attrs = dict(attrs or {})
    if state == TrialState.FAIL:
        attrs.update(fail_reason=why, final=True)
    try:
        trial_id = study.get_trials(deepcopy=False)[number]._trial_id
        for key, item in attrs.items():
            study._storage.set_trial_user_attr(trial_id, key, item)
        study.tell(number, value if state == TrialState.COMPLETE else None, state=state)
    except (ValueError, RuntimeError) as exc:  # reaped meanwhile by someone who took this worker for dead
        _say(f"trial {number}: could not tell {state.name}: {exc}")


def run_trial(sweep_root: Path, study: optuna.Study, spec: SweepSpec, job: dict, trial: FrozenTrial, owner: dict,
              flag: PreemptionFlag, orders: Orders | None = None) -> TrialState:
    """Train one trial (resuming its run if it has one) and tell the study how it ended.

    ``flag`` is the worker's signal flag: set before training starts (a cancel while the trial was claimed
    or prepared), the trial is handed back untouched and the worker stops; training installs its own
    handlers, and the worker's go back in as soon as it returns. ``orders``: a multi-task trial's channel to its
    other tasks, which then train the trial with this one (:mod:`launcher.sweep.orders`)."""
    from launcher.entry import TrainingFailed

    run_dir = prepare_run(sweep_root, job, trial, owner)
    again = " (resuming)" if runs.newest_checkpoint(run_dir) else ""
    _say(f"trial {trial.number}{again}: {', '.join(f'{k}={v!r}' for k, v in trial.params.items())} in {run_dir}")
    if flag.set:
        stop_between_trials(flag, sweep_root, study, trial)
    if orders is not None:
        use_trial_port(trial.number)
        orders.give(TRAIN, trial.number)
    reporter = Reporter(study, trial, spec.metric)
    hooks.install(reporter, hparams={**trial.params, "trial": trial.number})
    task = trial_task(run_dir, job)
    try:
        code = task()["exit"]
    except TrainingFailed as exc:
        tell(study, trial.number, TrialState.FAIL, why=str(exc))
        return TrialState.FAIL
    except Exception as exc:  # noqa: BLE001 - a trial's error ends the trial, not the sweep
        tell(study, trial.number, TrialState.FAIL, why=f"{type(exc).__name__}: {exc}")
        return TrialState.FAIL
    finally:
        hooks.uninstall()
        flag.install()  # training replaced the handlers; a signal from now on stops this worker
    if code == hooks.EXIT_PRUNED:
        tell(study, trial.number, TrialState.PRUNED)
        _say(f"trial {trial.number} PRUNED at step {reporter.pruned_at}")
        return TrialState.PRUNED
    return tell_result(study, spec, trial, run_dir)


def tell_result(study: optuna.Study, spec: SweepSpec, trial: FrozenTrial, run_dir: Path) -> TrialState:
    """A trial that trained to its end: COMPLETE with its metric (at the checkpoint ``eval`` loads), else FAIL."""
    value, step = trial_value(run_dir, spec.metric)
    if value is None:
        tell(study, trial.number, TrialState.FAIL, why=f"no finite {spec.metric} at its best checkpoint")
        return TrialState.FAIL
    tell(study, trial.number, TrialState.COMPLETE, value, attrs={"value_step": step})
    _say(f"trial {trial.number} COMPLETE: {spec.metric} {value:.6g} (its checkpoint of step {step})")
    return TrialState.COMPLETE


def stop_between_trials(
    flag: PreemptionFlag,
    sweep_root: Path | None = None,
    study: optuna.Study | None = None,
    claimed: FrozenTrial | None = None,
) -> None:
    """A signal while no trial trains: requeue this array task (SLURM) and leave, as a run would. A trial
    claimed but not started yet is handed back (orphaned), so that the next worker takes it under its number
    rather than the reaper taking it for a dead worker's and failing it."""
    if claimed is not None:
        with ask_lock(sweep_root):
            disown(study, claimed._trial_id)
        _say(f"trial {claimed.number} handed back before it started")
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60)
    _say(f"signal {flag.signum} between trials; {'requeued job ' + job if job else 'stopping'}")
    sys.stdout.flush()
    os._exit(EXIT_REQUEUE)


class SweepWorker:
    """The picklable callable of each array task: ``SweepWorker(SWEEP_DIR)(index)``. A trial with several tasks
    has every task call it: the first leads (claims, trains, tells), the others follow its orders."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.sweep_dir = str(sweep_dir)

    def __call__(self, index: int = 0) -> dict[str, Any]:
        root = Path(self.sweep_dir)
        spec, job = read_sweep_dir(root)
        if "SLURM_JOB_ID" in os.environ:  # after the last trial (even a pruned one), leave as a run's task does
            from launcher.entry import exit_clean_after_result

            atexit.register(exit_clean_after_result)
        orders = Orders.for_this_task(root) if task_count() > 1 else None
        flag = PreemptionFlag().install()  # training installs its own while a trial runs
        if orders is not None and task_rank() > 0:
            return follow(root, job, orders, flag)
        return lead(root, spec, job, index, flag, orders)


def lead(
    root: Path, spec: SweepSpec, job: dict, index: int, flag: PreemptionFlag, orders: Orders | None
) -> dict[str, Any]:
    """Claim trials and train them until the study has its count (with ``orders``, for all the tasks)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    # A worker started later (a resume, a requeue, a replacement) must not replay an earlier one's draws.
    earlier = len(open_study(root, spec).get_trials(deepcopy=False))
    study = open_study(root, spec, seed_offset=1000 * index + restart + 100_003 * earlier)
    owner = this_owner(index)
    tasks = f", {task_count()} tasks per trial" if orders is not None else ""
    _say(f"worker {index} of sweep {root.name} ({spec.sampler}, pruner {spec.pruner}{tasks}) started")
    ended: dict[str, int] = {}
    while True:
        if flag.set:
            stop_between_trials(flag)
        trial, said = claim(root, study, spec, owner)
        for line in said:
            _say(line)
        if trial == DONE:
            break
        if trial == WAIT:
            if orders is not None:
                orders.heartbeat()
            time.sleep(POLL_S)
            continue
        state = run_trial(root, study, spec, job, trial, owner, flag, orders)
        ended[state.name] = ended.get(state.name, 0) + 1
    if orders is not None:
        orders.give(ORDER_DONE)
    _say(f"worker {index}: the study has its {spec.trials} trials; this worker ran {ended or 'none'}")
    return {"sweep": str(root), "ran": ended}


def follow(root: Path, job: dict, orders: Orders, flag: PreemptionFlag) -> dict[str, Any]:
    """A task other than the first of a multi-task trial: train each trial the leader orders, as one rank of
    its run. The leader alone talks to the study. A signal between trials is the leader's to act on (it
    requeues the array task, and SLURM ends this task with it: every task runs under --kill-on-bad-exit);
    a leader silent for ``parallel.timeout_s`` ends this task as a lost peer."""
    from launcher.recovery import EXIT_RANK_LOST

    trained = 0
    while True:
        order = orders.take(float(job["parallel"]["timeout_s"]))
        if order is None:
            _say(f"task {task_rank()}: no order from the leader for parallel.timeout_s; leaving")
            sys.stdout.flush()
            os._exit(EXIT_RANK_LOST)
        if order["order"] == ORDER_DONE:
            return {"sweep": str(root), "followed": trained}
        run_dir = SweepDir(root).trial(order["trial"])
        use_trial_port(order["trial"])
        task = trial_task(run_dir, job)
        try:
            task()
        except Exception as exc:  # noqa: BLE001 - the leader tells the study how this trial ended
            _say(f"task {task_rank()}: trial {order['trial']} ended with {type(exc).__name__}: {exc}")
        finally:
            flag.install()
        trained += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.sweep.worker")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    SweepWorker(args.sweep_dir)(args.index)
    sys.stdout.flush()
    os._exit(0)  # gloo may abort at interpreter exit (see launcher.entry)


if __name__ == "__main__":
    main()
