"""Checkpoints that survive preemption: write to ``step-N.tmp/``, fsync, rename, then ``COMPLETE``.

A checkpoint directory counts only when its ``COMPLETE`` marker exists and the files it lists have
the recorded sizes and checksums, so a kill at any moment leaves the previous complete checkpoint
as the one to resume from. Layout of ``RUN/checkpoints/step-XXXXXXXX/``:

- ``model.pt``, ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``: ``state_dict`` of each object
  (the model unwrapped), written by rank 0 since DDP replicates them;
- with DeepSpeed, ``deepspeed/``: the engine's collective checkpoint (model states and each rank's
  optimizer partition) in place of ``model.pt`` and ``optimizer.pt``; ``scheduler.pt`` as above;
- ``rng-rankR.pt``: the python, numpy and torch RNG states of rank R;
- ``meta.json``: step, data cursor, train state and the metric, readable without torch;
- ``COMPLETE``: written last; the size and sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from shards.manifest import fsync_dir, write_json_atomic

STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify_checkpoint(step_dir: Path) -> str | None:
    """None if ``step_dir`` is complete and intact, else the reason it is not."""
    marker = step_dir / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker"
    try:
        listing = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable COMPLETE marker ({exc})"
    for name, expected in listing.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_complete(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint that is complete and intact; damaged ones are reported and passed over."""
    for _, path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"checkpoint {path.name} is not usable ({problem}); trying an older one")
    return None


def load_model_state(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights in a checkpoint, as a plain state dict."""
    step_dir = Path(step_dir)
    if (step_dir / "model.pt").is_file():
        return torch.load(step_dir / "model.pt", map_location="cpu", weights_only=True)
    from lenstrain.deepspeed_backend import load_deepspeed_model_state

    return load_deepspeed_model_state(step_dir)


def read_meta(step_dir: Path) -> dict:
    return json.loads((step_dir / "meta.json").read_text())


def recorded_metric(step_dir: Path, metric: str) -> float | None:
    """The value of ``metric`` recorded with a checkpoint, or None when absent, unreadable or not finite."""
    try:
        value = read_meta(step_dir).get("metrics", {}).get(metric)
    except (OSError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_checkpoint(ckpt_root: Path, metric: str | None, mode: str, *, verify: bool = False,
                    log=None) -> Path | None:
    """The complete checkpoint with the best recorded ``metric`` (``mode`` ``min`` or ``max``), or None.

    The one rule, for pruning and for ``eval``: a checkpoint whose value is missing or not finite is
    never best, and among equal values the newer step wins. ``verify`` checks sizes and checksums
    (reporting unusable checkpoints to ``log``) rather than only the ``COMPLETE`` marker.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"best mode must be 'min' or 'max', got {mode!r}")
    if not metric:
        return None
    best: tuple[float, int, Path] | None = None
    for step, path in list_checkpoints(Path(ckpt_root)):
        problem = verify_checkpoint(path) if verify else (None if (path / COMPLETE).is_file() else "incomplete")
        if problem is not None:
            if verify and log is not None:
                log(f"checkpoint {path.name} is not usable ({problem}); passing it over")
            continue
        value = recorded_metric(path, metric)
        if value is None:
            continue
        key = (value if mode == "min" else -value, -step, path)  # smaller is better; the newer step breaks ties
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else best[2]


class Checkpointer:
    """Saves and restores the training state of every rank, collectively."""

    def __init__(self, run_dir: Path, backend, *, keep: int, best_metric: str | None, best_mode: str, log=print):
        self.root = Path(run_dir) / "checkpoints"
        self.backend = backend
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.log = log
        self.saved_step: int | None = None
        if backend.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):  # left by a kill mid-save
                shutil.rmtree(stale, ignore_errors=True)
        backend.barrier()

    def save(self, step: int, objects: dict[str, object], meta: dict) -> Path:
        info = self.backend.info
        final = self.root / step_dir_name(step)
        if verify_checkpoint(final) is None:  # this step is already saved
            return final
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete one from an earlier attempt
            tmp.mkdir(parents=True)
        self.backend.barrier()
        saver = getattr(self.backend, "save_sharded", None)
        if saver is not None:  # DeepSpeed: every rank writes its own shards of model and optimizer
            saver(tmp)
        if info.is_main:  # what is replicated (with DeepSpeed: what the engine does not hold)
            for key, obj in objects.items():
                torch.save(obj.state_dict(), tmp / f"{key}.pt")
        if info.is_main:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
        self.backend.barrier()
        if info.is_main:
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                _fsync_file(path)
                files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for sub in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
                fsync_dir(sub)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_json_atomic(final / COMPLETE, {"step": step, "files": files})
            self._prune()
        self.backend.barrier()
        self.saved_step = step
        return final

    def _prune(self) -> None:
        complete = [(s, p) for s, p in list_checkpoints(self.root) if (p / COMPLETE).is_file()]
        keep = {p for _, p in complete[-self.keep :]}
        best = self.best()
        if best is not None:
            keep.add(best)
        for _, path in complete:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def best(self) -> Path | None:
        return best_checkpoint(self.root, self.best_metric, self.best_mode)

    def latest(self) -> Path | None:
        found = latest_complete(self.root, log=self.log) if self.backend.info.is_main else None
        found = self.backend.broadcast_object(str(found) if found else None)
        return Path(found) if found else None

    def load(self, step_dir: Path, objects: dict[str, object]) -> dict:
        info = self.backend.info
        loader = getattr(self.backend, "load_sharded", None)
        if loader is not None:
            loader(step_dir)
        for key, obj in objects.items():
            state = torch.load(step_dir / f"{key}.pt", map_location=info.device if key != "model" else "cpu",
                               weights_only=False)
            obj.load_state_dict(state)
        rng_file = step_dir / f"rng-rank{info.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return read_meta(step_dir)
