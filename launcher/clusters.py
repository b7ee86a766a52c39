"""Cluster profiles: what a cluster offers, read from ``slurm/clusters/NAME.yaml``.

A profile names the SLURM configuration to talk to, the default partition/account/qos, the size of
a node (GPUs, CPUs, memory), how many nodes a job may take, setup lines run before ``srun`` (module
loads, environment), extra ``srun`` arguments and the signal the cluster sends before a time limit.
A job's ``resources.cluster`` picks one; the job's requests are checked against it before anything
is submitted.

Profiles are searched in this order, the first file of a name winning: ``$LENSTRAIN_CLUSTERS_DIR`` (one folder,
or several separated by ``:``), ``~/.config/lenstrain/clusters/`` and the repository's ``slurm/clusters/``.
``python -m launcher clusters`` lists each with the file it came from. ``LENSTRAIN_CLUSTER`` names the
profile a job without ``resources.cluster`` uses (default: ``devcluster``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from launcher.values import SbatchValue, ShellLine, SlurmNames, _run_name
from lenstrain.config.schema import ConfigError, format_validation_error, read_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTERS_ENV = "LENSTRAIN_CLUSTERS_DIR"
DEFAULT_CLUSTER_ENV = "LENSTRAIN_CLUSTER"
FALLBACK_CLUSTER = "devcluster"
USER_CLUSTERS_DIR = Path("~/.config/lenstrain/clusters")
# The signals the training loop turns into a collective checkpoint (lenstrain.run.preemption).
PREEMPT_SIGNALS = ("USR2", "TERM")


def _profile_name(value: str) -> str:
    """A profile's name: a plain file name in the profiles' folder."""
    try:
        return _run_name(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a cluster profile's name (letters, digits, '_', '-', '.'; it names "
                         f"slurm/clusters/NAME.yaml)") from None


ProfileName = Annotated[str, AfterValidator(_profile_name)]


class ClusterProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ProfileName
    kind: Literal["slurm", "local"] = "slurm"
    slurm_conf: str | None = None  # relative paths are relative to the repository root
    # What reaches the sbatch script has a type of launcher.values, as the job's resources do.
    partition: SlurmNames | None = None
    account: SlurmNames | None = None
    qos: SlurmNames | None = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: int | None = Field(None, ge=1)
    mem_per_node_gb: float | None = Field(None, gt=0)
    max_nodes: int | None = Field(None, ge=1)
    setup: list[ShellLine] = Field(default_factory=list)
    srun_args: list[SbatchValue] = Field(default_factory=list)
    preempt_signal: str = "USR2"
    sbatch: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="site sbatch options for every job (a job's resources.sbatch overrides)")

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, value: dict) -> dict:
        from launcher.sbatch_options import checked_options

        return checked_options(value, "sbatch")

    @field_validator("preempt_signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        value = value.upper().removeprefix("SIG")
        if value not in PREEMPT_SIGNALS:
            raise ValueError(f"{value!r} is not caught by the training loop; valid choices: {', '.join(PREEMPT_SIGNALS)}")
        return value

    @property
    def slurm_conf_path(self) -> Path | None:
        if not self.slurm_conf:
            return None
        path = Path(os.path.expandvars(os.path.expanduser(self.slurm_conf)))
        return path if path.is_absolute() else REPO_ROOT / path


def search_path() -> list[Path]:
    """The folders profiles are read from, first match winning."""
    folders = [Path(p).expanduser() for p in os.environ.get(CLUSTERS_ENV, "").split(os.pathsep) if p]
    folders += [USER_CLUSTERS_DIR.expanduser(), REPO_ROOT / "slurm" / "clusters"]
    return list(dict.fromkeys(folders))


def profile_files() -> dict[str, list[Path]]:
    """Each profile name with its files, in search order (the first one is used; later ones are shadowed)."""
    found: dict[str, list[Path]] = {}
    for folder in search_path():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, []).append(path)
    return dict(sorted(found.items()))


def list_profiles() -> list[str]:
    return list(profile_files())


def default_cluster() -> str:
    """The profile of a job that names none: ``$LENSTRAIN_CLUSTER``, else ``devcluster``."""
    return os.environ.get(DEFAULT_CLUSTER_ENV, "").strip() or FALLBACK_CLUSTER


def profile_path(name: str) -> Path | None:
    files = profile_files().get(name)
    return files[0] if files else None


def load_profile(name: str) -> ClusterProfile:
    path = profile_path(name)
    if path is None or not path.is_file():
        known = list_profiles()
        where = ", ".join(str(p) for p in search_path())
        raise ConfigError(
            f"unknown cluster profile {name!r}; valid choices: {', '.join(known) or '(none in ' + where + ')'}"
        )
    data = read_yaml(path, not_a_mapping="a cluster profile must be a mapping")
    data.setdefault("name", name)
    try:
        return ClusterProfile.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, ClusterProfile)
        raise ConfigError(message.replace("invalid config:", f"invalid cluster profile {path}:", 1)) from None
