"""The sweep's study: an Optuna journal file in the sweep directory (``JournalFileBackend``: a file on the
shared filesystem, no database), claimed trial by trial under a lock.

Optuna has no heartbeat for journal storage, so each RUNNING trial names its owner in its user attrs
(``owner``: a SLURM job id, or a host and pid). Whoever claims a trial, and ``status``/``resume``, first
reaps: a trial whose owner is gone is FAIL (its parameters enqueued again, up to ``retries`` times), unless
its run stopped after a checkpoint (cancel, a requeue that was cancelled): then it waits, RUNNING and
``orphaned``, for the next worker to adopt and resume it under the same number.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from launcher import runs
from launcher.lifecycle.lock import exclusive
from launcher.lifecycle.processes import worker_alive
from launcher.sweep.paths import JOURNAL_FILE, SWEEP_FILE, SweepDir, find_sweep, is_sweep  # noqa: F401
from launcher.sweep.samplers import make_pruner, make_sampler
from launcher.sweep.spec import SweepSpec
from lenstrain.checkpointing.rundir import JOB_FILE, write_atomic

ORPHAN_GRACE_S = (
    120  # a RUNNING trial with no owner yet (its worker died while claiming it) is dead after this
)
STOPPED_OUTCOMES = {"cancelled", "stopped", "requeued", "requeued-by-slurm", "requeue-limit"}
DONE, WAIT = "done", "wait"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------ sweep.yaml


def write_sweep(root: Path, spec: SweepSpec, job: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"sweep": spec.model_dump(mode="json", by_alias=True, exclude_none=True), "base_job": job}
    write_atomic(root / SWEEP_FILE, yaml.safe_dump(data, sort_keys=False))


def read_sweep_dir(root: Path) -> tuple[SweepSpec, dict]:
    data = yaml.safe_load((Path(root) / SWEEP_FILE).read_text())
    return SweepSpec.model_validate(data["sweep"]), data["base_job"]


# ------------------------------------------------------------------------------------ the study


def storage_for(root: Path) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(root) / JOURNAL_FILE)))


def open_study(root: Path, spec: SweepSpec, seed_offset: int = 0) -> optuna.Study:
    """The sweep's study (created on first use), with this process's sampler and the sweep's pruner."""
    sampler = make_sampler(
        spec.sampler,
        spec.seed + seed_offset,
        spec.sampler_options,
        spec.grid() if spec.sampler == "grid" else None,
    )
    return optuna.create_study(
        storage=storage_for(root),
        study_name=spec.name,
        direction=spec.direction,
        sampler=sampler,
        pruner=make_pruner(spec.pruner, spec.pruner_options),
        load_if_exists=True,
    )


def create_study(root: Path, spec: SweepSpec) -> optuna.Study:
    """The study, and for ``grid`` every combination enqueued once, in order, the first time."""
    study = open_study(root, spec)
    with ask_lock(root):
        if spec.sampler == "grid" and not study.get_trials(deepcopy=False):
            for params in spec.grid_points()[: spec.trials]:
                study.enqueue_trial(params)
    return study


def ask_lock(root: Path):
    """One claimer at a time (``SWEEP/.claim.lock``): reaping, adopting and asking decide together what the
    budget allows."""
    return exclusive(Path(root) / ".claim.lock")


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by what they mean for the budget: done (COMPLETE, PRUNED, a FAIL not re-run), running, waiting."""
    out = {"done": 0, "running": 0, "waiting": 0, "retried": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            out["done"] += 1
        elif t.state == TrialState.FAIL:
            out["retried" if t.user_attrs.get("retried") else "done"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    return out


# ------------------------------------------------------------------------------------ owners


def this_owner(index: int = 0) -> dict[str, Any]:
    """Who runs a trial: this SLURM array task (its own job id survives requeues), or this host and pid."""
    owner: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "worker": index}
    if "SLURM_JOB_ID" in os.environ:
        owner.update(
            kind="slurm",
            job=os.environ["SLURM_JOB_ID"],
            array=f"{os.environ.get('SLURM_ARRAY_JOB_ID', '')}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}",
        )
    else:
        owner["kind"] = "local"
    return owner


def same_owner(a: dict | None, b: dict) -> bool:
    if not a or a.get("kind") != b.get("kind"):
        return False
    if a["kind"] == "slurm":
        return a.get("job") == b.get("job")
    return a.get("host") == b.get("host") and a.get("pid") == b.get("pid")


def owner_alive(owner: dict, slurm_ok: bool) -> bool | None:
    """True, False, or None when this machine cannot tell (another host; SLURM not reachable)."""
    if owner.get("kind") == "local":
        return worker_alive(owner["pid"]) if owner.get("host") == socket.gethostname() else None
    if not slurm_ok:
        return None
    from launcher.slurm import squeue_state

    state = squeue_state(owner["job"])
    return state is not None and state.split()[0] in runs.ACTIVE_STATES


def slurm_reachable() -> bool:
    from launcher.slurm import slurm_problem

    return slurm_problem() is None


# ------------------------------------------------------------------------------------ reaping


def stopped_after_checkpoint(trial_dir: Path) -> bool:
    """Whether the trial's run ended its last attempt on purpose after a checkpoint (it can be resumed)."""
    if not (trial_dir / JOB_FILE).is_file() or runs.newest_checkpoint(trial_dir) is None:
        return False
    jobs = runs.read_jobs(trial_dir, set_aside=True)["jobs"]
    attempts = jobs[-1].get("attempts", []) if jobs else []
    return bool(attempts) and attempts[-1].get("outcome") in STOPPED_OUTCOMES


def fail_and_retry(study: optuna.Study, spec: SweepSpec, trial: FrozenTrial, why: str) -> str:
    """Mark a trial FAIL; enqueue its parameters again unless it has had its ``retries``."""
    storage, tid = study._storage, trial._trial_id
    storage.set_trial_user_attr(tid, "fail_reason", why)
    retry = int(trial.user_attrs.get("retry", 0))
    if retry < spec.retries:
        storage.set_trial_user_attr(tid, "retried", True)
        study.enqueue_trial(trial.params, user_attrs={"retry": retry + 1, "retry_of": trial.number})
        what = f"its parameters are enqueued again (retry {retry + 1} of {spec.retries})"
    else:
        what = f"no retry left (retries: {spec.retries})"
    storage.set_trial_state_values(tid, TrialState.FAIL)
    return f"trial {trial.number}: {why}; marked FAIL, {what}"


def reap(root: Path, study: optuna.Study, spec: SweepSpec, slurm_ok: bool | None = None) -> list[str]:
    """Fail (and re-enqueue) the RUNNING trials whose owner is gone; orphan those that stopped after a checkpoint.

    Call under :func:`ask_lock`. Returns one line per trial changed.
    """
    said: list[str] = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if slurm_ok is None and any((t.user_attrs.get("owner") or {}).get("kind") == "slurm" for t in running):
        slurm_ok = slurm_reachable()
    for trial in running:
        owner = trial.user_attrs.get("owner")
        if owner is None:
            age = time.time() - trial.datetime_start.timestamp() if trial.datetime_start else 0
            if trial.user_attrs.get("orphaned") or age < ORPHAN_GRACE_S:
                continue
        elif owner_alive(owner, bool(slurm_ok)) is not False:
            continue
        gone = "its worker is gone" if owner else "it was never started"
        if stopped_after_checkpoint(SweepDir(root).trial(trial.number)):
            disown(study, trial._trial_id)
            said.append(f"trial {trial.number}: {gone} after a checkpoint; the next worker resumes it")
        else:
            said.append(fail_and_retry(study, spec, trial, f"{gone} (no checkpoint-and-requeue)"))
    return said


# ------------------------------------------------------------------------------------ claiming


def claim(root: Path, study: optuna.Study, spec: SweepSpec, owner: dict) -> tuple[Any, list[str]]:
    """The next trial for ``owner`` (a :class:`FrozenTrial` to train), :data:`DONE` or :data:`WAIT`, and what
    reaping said. Adopting its own or an orphaned trial comes first, then an enqueued one, then a new one
    while the budget allows."""
    with ask_lock(root):
        said = reap(root, study, spec)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        mine = [t for t in running if same_owner(t.user_attrs.get("owner"), owner)]
        orphans = [t for t in running if t.user_attrs.get("orphaned")]
        for trial in mine + orphans:
            _own(study, trial._trial_id, owner)
            return study.get_trials(deepcopy=False)[trial.number], said
        count = counts(study)
        if count["waiting"] == 0 and count["done"] + count["running"] >= spec.trials:
            return (DONE if count["done"] >= spec.trials else WAIT), said
        trial = study.ask(spec.distributions())
        _own(study, trial._trial_id, owner)
        return study.get_trials(deepcopy=False)[trial.number], said


def _own(study: optuna.Study, trial_id: int, owner: dict) -> None:
    study._storage.set_trial_user_attr(trial_id, "owner", owner)
    study._storage.set_trial_user_attr(trial_id, "orphaned", False)


def disown(study: optuna.Study, trial_id: int) -> None:
    """Leave a RUNNING trial ownerless and ``orphaned``: the next worker to claim adopts it under its number.
    Call under :func:`ask_lock`."""
    study._storage.set_trial_user_attr(trial_id, "owner", None)
    study._storage.set_trial_user_attr(trial_id, "orphaned", True)
