"""What the sweep tests share: a one-task base job on the ring shards and sweep files around it."""

from __future__ import annotations

from pathlib import Path

import yaml

from launcher.sweep.study import open_study, read_sweep_dir
from tests.factories import config_dict, merged

ONE_TASK = {
    "cluster": "devcluster",
    "nodes": 1,
    "tasks_per_node": 1,
    "cpus_per_task": 1,
    "time": 10,
    "signal_delay_s": 30,
    "max_requeues": 3,
}


def write_base(tmp: Path, shards: Path, steps: int = 12, **sections) -> Path:
    """A one-task job: alternet_tiny, ``steps`` steps, a validation and a checkpoint every 4."""
    job = merged(
        config_dict(shards),
        resources=ONE_TASK,
        train={"max_steps": steps, "val_every_steps": 4},
        checkpoint={"every_steps": 4, "keep": 2, "best_metric": "val/loss"},
    )
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(merged(job, **sections), sort_keys=False))
    return path


def write_sweep(tmp: Path, base_job: Path, name: str = "sw", **keys) -> Path:
    sweep = {
        "name": name,
        "base": str(base_job),
        "sampler": "tpe",
        "pruner": "none",
        "trials": 2,
        "parallel": 1,
        "seed": 0,
        "space": {"optim.lr": {"log_uniform": [1.0e-4, 1.0e-2]}},
    }
    sweep.update(keys)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def study_of(root: Path):
    spec, _ = read_sweep_dir(root)
    return open_study(root, spec)
