"""The run directory: every file of a run named once (and the atomic write of :mod:`shards.atomic`, re-exported).

``runs/NAME/`` holds everything a run needs and produces::

    job.yaml        the resolved job (name, resources and training sections)       launcher
    config.yaml     the resolved training sections, validated once, read by every task   launcher / train
    jobs.json       every job (SLURM or local) that served the run                  launcher
    progress.json   state, step, loss, throughput, best metric                      training (rank 0)
    checkpoints/    step-XXXXXXXX/ with COMPLETE written last                       training
    tb/             TensorBoard events                                              training (rank 0)
    logs/           per-rank logs of local runs                                     launcher
    submitit/       sbatch scripts, pickles and per-task logs                       launcher
    eval/           metrics, plots and predictions                                  eval
    profile/        torch.profiler traces                                           training

The launcher imports these names; nothing else spells them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The durable writes live at the lowest floor (shards.atomic); the run's files are written with them.
from shards.atomic import fsync_dir as fsync_dir
from shards.atomic import write_atomic as write_atomic
from shards.atomic import write_json_atomic as write_json_atomic

CONFIG_FILE = "config.yaml"
JOB_FILE = "job.yaml"
JOBS_FILE = "jobs.json"
PROGRESS_FILE = "progress.json"
CHECKPOINTS_DIR = "checkpoints"
TB_DIR = "tb"
LOGS_DIR = "logs"
SUBMITIT_DIR = "submitit"
EVAL_DIR = "eval"
PROFILE_DIR = "profile"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def job(self) -> Path:
        return self.root / JOB_FILE

    @property
    def jobs(self) -> Path:
        return self.root / JOBS_FILE

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def tb(self) -> Path:
        return self.root / TB_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def submitit(self) -> Path:
        return self.root / SUBMITIT_DIR

    @property
    def eval(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def profile(self) -> Path:
        return self.root / PROFILE_DIR
