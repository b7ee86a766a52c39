"""What many test modules build: the small ring shard set, training configs and launcher jobs, and the
comparison of two runs' final weights."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import yaml

from lenstrain.checkpointing.checkpoint import latest_complete, load_model_state
from lenstrain.checkpointing.rundir import RunDir
from shards.options import PackOptions
from shards.pack import TargetSpec, pack_shard_set
from shards.splits import stratified_split

# ------------------------------------------------------------------------------------ shard sets


class RingSample:
    """A ring whose radius encodes the target: learnable, cheap, deterministic."""

    def __init__(self, size: int = 32):
        self.size = size

    def __call__(self, i: int):
        rng = np.random.default_rng(i)
        y = float(rng.uniform(0, 1))
        yy, xx = np.mgrid[: self.size, : self.size]
        r = np.hypot(yy - self.size / 2, xx - self.size / 2)
        img = np.exp(-((r - 3 - self.size / 4 * y) ** 2) / 3) + 0.1 * rng.normal(size=(self.size, self.size))
        return img[None].astype(np.float32), {"y": y, "cls": int(y > 0.5)}


def make_ring_shards(out: Path, n: int = 120, shard_size: int = 25, size: int = 32) -> Path:
    """Rings with a regression target ``y`` and a two-class target ``cls``, split 70/15/15.

    The defaults (120 rings of 32x32: 84 train, 18 val, 18 test) are the set most tests share."""
    fn = RingSample(size)
    y = np.array([fn(i)[1]["y"] for i in range(n)])
    split = stratified_split(y, val=0.15, test=0.15, seed=0, regression=True)
    pack_shard_set(out, sample_fn=fn, split_of=split,
                   targets=[TargetSpec("y", "regression"), TargetSpec("cls", "classification", ["low", "high"])],
                   primary_target="y", source={"kind": "rings"}, options=PackOptions(shard_size=shard_size))
    return out


# ------------------------------------------------------------------------------------ configs and jobs


def merged(base: dict, **sections) -> dict:
    """A new dict: ``base`` with ``sections`` laid over it (a dict updates the section's keys, anything else
    replaces it). Nothing of ``base`` or ``sections`` is shared with the result, so callers may change it."""
    out = copy.deepcopy(base)
    for key, value in copy.deepcopy(sections).items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_dict(shards: Path, **sections) -> dict:
    """A small, exact training config: alternet_tiny on ``shards``, 12 steps of batch 4, fp32, deterministic.
    Augmentation runs on the training process's device (the CPU here), as on a GPU, which gives the images of
    the worker path bit for bit."""
    base = {
        "seed": 3,
        "data": {"shards": str(shards), "batch_size": 4, "workers": 0, "augment": {"device": "device"}},
        "model": {"name": "alternet_tiny"},
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": {"max_steps": 12, "precision": "fp32", "deterministic": True},
        "checkpoint": {"every_steps": 4, "keep": 2, "every_minutes": None},
        "log": {"every_steps": 1, "images": False},
    }
    return merged(base, **sections)


def write_config(path: Path, shards: Path, **sections) -> Path:
    """Write :func:`config_dict` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(config_dict(shards, **sections), sort_keys=False))
    return path


LAUNCHER_JOB = {
    "resources": {"cluster": "devcluster", "nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "time": 10,
                  "signal_delay_s": 30, "max_requeues": 3},
    "schedule": {"name": "cosine"},
    "train": {"max_steps": 40},
    "checkpoint": {"every_steps": 10, "keep": 10},
}


def launcher_job_dict(shards: Path, **sections) -> dict:
    """A job: :func:`config_dict` for 40 steps on 2 nodes x 1 task of the devcluster, checkpoints every 10."""
    return merged(config_dict(shards, **LAUNCHER_JOB), **sections)


# ------------------------------------------------------------------------------------ weights


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest complete checkpoint."""
    return load_model_state(latest_complete(RunDir(run_dir).checkpoints, log=lambda message: None))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts: the same keys and equal tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
