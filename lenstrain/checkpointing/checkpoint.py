"""Checkpoints that survive preemption and full disks: write ``step-N.tmp/``, fsync, rename, then ``COMPLETE``.

A checkpoint directory counts only when its ``COMPLETE`` marker exists and the files it lists have
the recorded sizes and checksums, so a kill at any moment leaves the previous complete checkpoint
as the one to resume from. A write that fails (full disk, quota, I/O error, permission) removes
that step's directory and raises :class:`CheckpointWriteError` on every rank; older checkpoints are
never touched. Layout of ``RUN/checkpoints/step-XXXXXXXX/``:

- ``model.pt``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``: ``state_dict`` of each object
  (the model unwrapped), written by rank 0 since DDP replicates them;
- with DeepSpeed, ``deepspeed/``: the engine's collective checkpoint (model states and each rank's
  optimizer partition) in place of ``model.pt`` and ``optimizer.pt``; ``scheduler.pt`` as above;
- ``rng-rankR.pt``: the python, numpy and torch RNG states of rank R, as tensors and lists;
- ``meta.json``: step, data cursor, train state and the metric, readable without torch;
- ``COMPLETE``: written last; the size and sha256 of every other file (its schema: :func:`read_marker`).

The backend writes and reads its own part (``Backend.save_state``/``load_state``); every file is read with
``weights_only=True``, DeepSpeed's with its three classes allowed (see :mod:`lenstrain.checkpointing.stateio`). A checkpoint
that cannot be read, for whatever reason, raises :class:`CheckpointReadError` naming the file, and the
readers (:func:`load_first`, training's resume) fall back to the previous complete one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from lenstrain.checkpointing.rundir import CHECKPOINTS_DIR, fsync_dir, write_json_atomic
from lenstrain.checkpointing.space import (
    CheckpointWriteError,
    checkpoint_bytes,
    estimate_checkpoint_bytes,
    free_space_warning,
    write_failure_line,
)
from lenstrain.checkpointing.stateio import (
    COMPLETE,
    DEEPSPEED_DIR,
    CheckpointReadError,
    load_deepspeed_model_state,
    load_rng_file,
    load_state_file,
    read_marker,
    rng_state,
    save_state_file,
    set_rng_state,
    sha256_file,
    verify_checkpoint,
)
from shards.atomic import fsync_file

__all__ = ["COMPLETE", "CheckpointReadError", "CheckpointWriteError", "Checkpointer", "best_checkpoint",
           "best_checkpoints", "complete_checkpoints", "estimate_checkpoint_bytes", "free_space_warning",
           "latest_complete", "list_checkpoints", "load_first", "load_model_state", "read_marker", "read_meta",
           "recorded_metric", "step_dir_name", "verify_checkpoint"]

STEP_RE = re.compile(r"step-(\d{8})")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def complete_checkpoints(ckpt_root: Path, log=print, *, before: int | None = None) -> Iterator[Path]:
    """The complete and intact checkpoints (older than step ``before``), newest first; damaged ones are reported
    and passed over. Each is verified only when the one before it was passed over."""
    for step, path in reversed(list_checkpoints(ckpt_root)):
        if before is not None and step >= before:
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            yield path
        else:
            log(f"checkpoint {path.name} is not usable ({problem}); trying an older one")


def latest_complete(ckpt_root: Path, log=print, *, before: int | None = None) -> Path | None:
    """The newest checkpoint that is complete and intact; damaged ones are reported and passed over."""
    return next(complete_checkpoints(ckpt_root, log, before=before), None)


def no_usable_checkpoint(ckpt_root: Path, problems: list[str]) -> CheckpointReadError:
    """The one-line error when every checkpoint under ``ckpt_root`` was passed over (the newest's reason)."""
    return CheckpointReadError(f"{ckpt_root}: no usable checkpoint; the newest: {problems[0]}")


def load_first(candidates: Iterable[Path], load: Callable[[Path], object], log=print,
               ckpt_root: Path | None = None) -> tuple[Path, object]:
    """The first checkpoint of ``candidates`` that ``load`` reads, and what it read. One that fails (any
    :class:`CheckpointReadError`: a refused, truncated or damaged file) is reported and passed over; when none
    can be read, :class:`CheckpointReadError` names the newest one's file and reason."""
    problems: list[str] = []
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointReadError as exc:
            problems.append(str(exc))
            log(f"checkpoint {path.name} cannot be read ({exc}); trying an older one")
    if problems:
        raise no_usable_checkpoint(ckpt_root or Path("."), problems)
    raise CheckpointReadError(f"{ckpt_root}: no complete checkpoint")


def load_model_state(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights in a checkpoint of any backend, as a plain state dict.

    The format is read from the checkpoint's files: ``model.pt``, or the DeepSpeed engine's directory.
    Any failure to read it raises :class:`CheckpointReadError` naming the file.
    """
    step_dir = Path(step_dir)
    if (step_dir / "model.pt").is_file():
        state = load_state_file(step_dir / "model.pt")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointReadError(f"{step_dir / 'model.pt'}: not a state dict of tensors")
        return state
    if (step_dir / DEEPSPEED_DIR).is_dir():
        return load_deepspeed_model_state(step_dir)
    raise CheckpointReadError(f"{step_dir} holds neither model.pt nor a DeepSpeed checkpoint ({DEEPSPEED_DIR}/)")


def read_meta(step_dir: Path) -> dict:
    """A checkpoint's ``meta.json``; :class:`CheckpointReadError` naming it when it is unreadable or not an
    object with the step."""
    path = Path(step_dir) / "meta.json"
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointReadError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        raise CheckpointReadError(f"{path}: not an object with an integer step")
    return meta


def recorded_metric(step_dir: Path, metric: str) -> float | None:
    """The value of ``metric`` recorded with a checkpoint, or None when absent, unreadable or not finite."""
    try:
        metrics = read_meta(step_dir).get("metrics", {})
    except CheckpointReadError:
        return None
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_checkpoints(ckpt_root: Path, metric: str | None, mode: str, *, verify: bool = False,
                     log=None) -> list[Path]:
    """The complete checkpoints that record a finite ``metric``, best first (``mode`` ``min`` or ``max``).

    The one rule, for pruning and for ``eval``: a checkpoint whose value is missing or not finite is
    never best, and among equal values the newer step wins. ``verify`` checks sizes and checksums
    (reporting unusable checkpoints to ``log``) rather than only the ``COMPLETE`` marker.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"best mode must be 'min' or 'max', got {mode!r}")
    if not metric:
        return []
    ranked: list[tuple[float, int, Path]] = []
    for step, path in list_checkpoints(Path(ckpt_root)):
        problem = verify_checkpoint(path) if verify else (None if (path / COMPLETE).is_file() else "incomplete")
        if problem is not None:
            if verify and log is not None:
                log(f"checkpoint {path.name} is not usable ({problem}); passing it over")
            continue
        value = recorded_metric(path, metric)
        if value is None:
            continue
        ranked.append((value if mode == "min" else -value, -step, path))  # smaller is better; newer breaks ties
    return [path for *_, path in sorted(ranked, key=lambda key: key[:2])]


def best_checkpoint(ckpt_root: Path, metric: str | None, mode: str, *, verify: bool = False,
                    log=None) -> Path | None:
    """The complete checkpoint with the best recorded ``metric``, or None (see :func:`best_checkpoints`)."""
    ranked = best_checkpoints(ckpt_root, metric, mode, verify=verify, log=log)
    return ranked[0] if ranked else None


class Checkpointer:
    """Saves and restores the training state of every rank, collectively."""

    def __init__(self, run_dir: Path, backend, *, keep: int, best_metric: str | None, best_mode: str, log=print):
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.backend = backend
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.log = log
        self.saved_step: int | None = None
        self.unreadable: set[int] = set()  # steps whose checkpoint could not be loaded: saved anew, never kept
        if backend.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):  # left by a kill mid-save
                shutil.rmtree(stale, ignore_errors=True)
        backend.barrier()

    # --- saving --------------------------------------------------------------------------------
    def save(self, step: int, objects: dict[str, object], meta: dict) -> Path:
        """Collective: write ``objects``, the RNG states and ``meta`` as the checkpoint of ``step``.

        Raises :class:`CheckpointWriteError` on every rank when any rank's write failed.
        """
        final = self.root / step_dir_name(step)
        if step not in self.unreadable and verify_checkpoint(final) is None:  # this step is already saved
            return final
        tmp = final.with_name(final.name + ".tmp")
        self._attempt(step, lambda: self._prepare(tmp, final))
        self._attempt(step, lambda: self._write(tmp, objects, meta))
        self._attempt(step, lambda: self._publish(step, tmp, final))
        self.saved_step = step
        return final

    def _prepare(self, tmp: Path, final: Path) -> None:
        if self.backend.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete one from an earlier attempt
            tmp.mkdir(parents=True)

    def _write(self, tmp: Path, objects: dict[str, object], meta: dict) -> None:
        self.backend.save_state(tmp, objects)
        if self.backend.info.is_main:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        save_state_file(rng_state(), tmp / f"rng-rank{self.backend.info.rank}.pt")

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        """Rank 0: fsync every file, rename ``tmp`` to ``final``, write ``COMPLETE`` last, prune."""
        if not self.backend.info.is_main:
            return
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(path)
            files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for sub in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            fsync_dir(sub)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_json_atomic(final / COMPLETE, {"step": step, "files": files})
        self._prune()

    def _attempt(self, step: int, work) -> None:
        """Run ``work`` on every rank; when it raised an OSError on any, clean up and raise on every rank."""
        try:
            work()
            error = None
        except OSError as exc:
            error = str(exc)
        errors = self.backend.gather_objects(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if not failed:
            return
        line = self._clean_up_failed(step, failed) if self.backend.info.is_main else None
        raise CheckpointWriteError(self.backend.broadcast_object(line))

    def _clean_up_failed(self, step: int, failed: list[tuple[int, str]]) -> str:
        """Rank 0: remove this step's partial checkpoint (never an older one); the line that reports it."""
        name = step_dir_name(step)
        written = 0
        for partial in (self.root / f"{name}.tmp", self.root / name):
            written = max(written, checkpoint_bytes(partial))
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_complete(self.root, log=lambda message: None)
        needed = max(written, checkpoint_bytes(previous) if previous else 0,
                     estimate_checkpoint_bytes(self.backend.model, self.backend.optimizer))
        rank, error = failed[0]
        return write_failure_line(name, f"rank {rank}: {error}", needed, self.root, previous)

    def _prune(self) -> None:
        complete = [(s, p) for s, p in list_checkpoints(self.root) if (p / COMPLETE).is_file()]
        keep = {p for _, p in complete[-self.keep :]}
        best = self.best()
        if best is not None:
            keep.add(best)
        for _, path in complete:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # --- finding and loading -------------------------------------------------------------------
    def best(self) -> Path | None:
        return best_checkpoint(self.root, self.best_metric, self.best_mode)

    def latest(self, before: int | None = None) -> Path | None:
        """Collective: the newest complete and intact checkpoint (older than step ``before``), as rank 0 finds it."""
        found = latest_complete(self.root, log=self.log, before=before) if self.backend.info.is_main else None
        found = self.backend.broadcast_object(str(found) if found else None)
        return Path(found) if found else None

    def load(self, step_dir: Path, objects: dict[str, object]) -> dict:
        """Collective: restore ``objects`` and this rank's RNG states from ``step_dir``; return its meta.

        A file that cannot be read raises :class:`CheckpointReadError` naming it; so does a state its object
        rejects (a checkpoint of another model)."""
        try:
            self.backend.load_state(step_dir, objects)
            rng_file = step_dir / f"rng-rank{self.backend.info.rank}.pt"
            if rng_file.is_file():
                set_rng_state(load_rng_file(rng_file))
        except CheckpointReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a state that does not fit its object, a damaged RNG state
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointReadError(f"{step_dir}: its state does not load ({type(exc).__name__}: {first})") from None
        return read_meta(step_dir)

    def agree(self, problem: str | None) -> str | None:
        """Collective: the first rank's problem, if any rank had one (every rank gets the same answer)."""
        return next((p for p in self.backend.gather_objects(problem) if p is not None), None)
