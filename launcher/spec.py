"""A job: the ``resources:`` the launcher asks SLURM for, plus lenstrain's training sections.

:class:`JobSpec` extends lenstrain's :class:`~lenstrain.config.LenstrainConfig` with ``name`` and
``resources``, so one strict validation (unknown keys rejected) covers the whole file and every
error names its dotted path. That validation happens once, in :func:`read_job`; :func:`check_job`
then checks what pydantic cannot: the requests against the cluster profile (nodes, GPUs, CPUs,
memory), the consistency of tasks and GPUs, and the config against its shard set (for the ranks that
will really run). :func:`load_job` does both and reports every problem at once, as a :class:`ConfigError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from launcher.clusters import ClusterProfile, ProfileName, default_cluster, list_profiles, load_profile
from launcher.sbatch_options import (
    MAIL_TYPES,
    check_gres,
    check_hostlist,
    check_mail_type,
    check_mail_user,
    check_name,
    check_sbatch_text,
    checked_options,
    gres_gpus,
)
from launcher.values import RunName, SbatchValue, ShellLine, SlurmNames, one_line
from lenstrain.config.inherit import resolve_bases
from lenstrain.config.schema import (
    ConfigError,
    LenstrainConfig,
    Section,
    apply_overrides,
    parse_yaml_text,
    read_text,
    validated,
)
from shards.clikit import Problem

if TYPE_CHECKING:
    from lenstrain.run.preflight import MetaModel
    from shards.manifest import Manifest

TRAINING_SECTIONS = tuple(LenstrainConfig.model_fields)
_TIME_RE = re.compile(r"(?:(?P<d>\d+)-)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})")
_MEM_RE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<u>[KMGT])B?", re.IGNORECASE)


# YAML 1.1 reads 1:30:00 as the base-60 integer 5400; a job file means a time of day. These loaders
# keep such scalars as strings (as YAML 1.2 does).
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")


class _JobLoader(yaml.SafeLoader):
    pass


_JobLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*(?:[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _read_one_job_yaml(path: str | Path) -> dict:
    """One job file like :func:`lenstrain.config.read_yaml` (missing file, bad YAML, size limits named),
    keeping ``1:30:00`` a string."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_yaml_text(read_text(path), path, loader=_JobLoader)  # a SafeLoader subclass


def read_job_yaml(path: str | Path) -> dict:
    """Read a job file like :func:`lenstrain.config.read_yaml`, keeping ``1:30:00`` a string, with its
    ``base:`` chain merged in (:mod:`lenstrain.config.inherit`: a deep merge, bases relative to the file naming them)."""
    return resolve_bases(path, _read_one_job_yaml, ConfigError)


def _quote_times(overrides: list[str] | None) -> list[str]:
    out = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        out.append(f"{key}={sep and ''}'{raw}'" if sep and _SEXAGESIMAL.fullmatch(raw.strip()) else item)
    return out


def parse_time_minutes(value: int | str) -> int:
    """Minutes of a SLURM time limit given as minutes or ``[D-]HH:MM:SS`` (seconds round up)."""
    if isinstance(value, bool):
        raise ValueError("expected minutes (e.g. 90) or HH:MM:SS (e.g. 01:30:00)")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("must be at least 1 minute")
        return value
    text = str(value).strip()
    if text.isdigit():
        return parse_time_minutes(int(text))
    match = _TIME_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{value!r} is not a time; expected minutes (e.g. 90) or HH:MM:SS (e.g. 01:30:00)")
    d, h, m, s = (int(match.group(k) or 0) for k in "dhms")
    if m >= 60 or s >= 60:
        raise ValueError(f"{value!r}: minutes and seconds must be below 60")
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    if seconds < 60:
        raise ValueError(f"{value!r}: SLURM time limits are whole minutes; ask for at least 00:01:00")
    return math.ceil(seconds / 60)


def parse_mem_gb(value: str) -> float:
    match = _MEM_RE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a memory size; expected a number and a unit, e.g. 16G, 500M")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[match.group("u").upper()]
    return float(match.group("n")) * scale


class Resources(Section):
    """What one job asks of the cluster. ``cluster`` names a profile in ``slurm/clusters/``."""

    cluster: ProfileName = Field(default_factory=default_cluster, description=(
        "a cluster profile (python -m launcher clusters lists them); default: $LENSTRAIN_CLUSTER, else devcluster"))
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1, description="default: one per GPU, or 1 on CPU")
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = Field(None, description="per node, e.g. 16G")
    time: int | str = Field(60, description="minutes, or HH:MM:SS")
    # Every value that reaches the sbatch script has a type of launcher.values: one line, no control characters.
    partition: SlurmNames | None = None  # default: the profile's
    account: SlurmNames | None = None
    qos: SlurmNames | None = None
    constraint: SbatchValue | None = None
    signal_delay_s: int = Field(120, ge=1, description="seconds between the signal and the time limit")
    max_requeues: int = Field(3, ge=0, description="requeues of the run, across resumes (preemption or time limit)")
    setup: list[ShellLine] = Field(default_factory=list, description="shell lines run before srun, one line each")

    # --- site SLURM options (issue 21). Each value reaches an #SBATCH line: launcher.sbatch_options checks
    # it is one line without control characters (issue 18 unifies this into one string type).
    gres: str | None = Field(None, description=(
        "generic resources per node, e.g. gpu:a100:4 (its GPU count must equal gpus_per_node); "
        "default: gpu:<gpus_per_node> when gpus_per_node > 0"))
    exclusive: bool | Literal["user", "mcs"] = Field(False, description="whole nodes: true, or 'user' / 'mcs'")
    exclude: str | None = Field(None, description="nodes not to run on, a SLURM node list (e.g. n[01-04])")
    nodelist: str | None = Field(None, description="nodes to run on, a SLURM node list")
    reservation: str | None = Field(None, description="a SLURM reservation's name")
    mail_type: str | None = Field(None, description="comma-separated: " + ", ".join(MAIL_TYPES))
    mail_user: str | None = Field(None, description="where SLURM mails (with mail_type)")
    comment: str | None = Field(None, description="a comment on the job (sacct shows it)")
    sbatch: dict[str, str | int | float | bool | None] = Field(default_factory=dict, description=(
        "any other sbatch long option: {option: value}; true: a flag; false/null: left out. Unknown options "
        "and those the launcher owns (signal, requeue, array, output, error, ...) are refused"))

    @field_validator("gres")
    @classmethod
    def _gres(cls, value: str | None) -> str | None:
        return None if value is None else check_gres(value)

    @field_validator("exclude", "nodelist")
    @classmethod
    def _hostlist(cls, value: str | None) -> str | None:
        return None if value is None else check_hostlist(value)

    @field_validator("reservation")
    @classmethod
    def _reservation(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "reservation")

    @field_validator("mail_type")
    @classmethod
    def _mail_type(cls, value: str | None) -> str | None:
        return None if value is None else check_mail_type(value)

    @field_validator("mail_user")
    @classmethod
    def _mail_user(cls, value: str | None) -> str | None:
        return None if value is None else check_mail_user(value)

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str | None) -> str | None:
        return None if value is None else check_sbatch_text(value, "comment")

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, value: dict) -> dict:
        return checked_options(value, "resources.sbatch")

    @property
    def gres_line(self) -> str | None:
        """``--gres``: as given (with ``gpu:N`` added when it names no GPUs and ``gpus_per_node`` asks for some),
        else ``gpu:N`` from ``gpus_per_node``."""
        gpus = f"gpu:{self.gpus_per_node}" if self.gpus_per_node else None
        if self.gres:
            return self.gres if gpus is None or gres_gpus(self.gres) is not None else f"{self.gres},{gpus}"
        return gpus
    # --- end of the site SLURM options

    @field_validator("time")
    @classmethod
    def _time(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            one_line(value, what="a time")
        parse_time_minutes(value)
        return value.strip() if isinstance(value, str) else value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        if value is not None:
            one_line(value, what="a memory size")
            parse_mem_gb(value)
            value = value.strip()
        return value

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_minutes(self) -> int:
        return parse_time_minutes(self.time)

    @property
    def mem_gb(self) -> float | None:
        return None if self.mem is None else parse_mem_gb(self.mem)


class JobSpec(LenstrainConfig):
    """A whole job file: ``name``, ``resources`` and the training sections."""

    name: RunName | None = None
    resources: Resources = Field(default_factory=Resources)

    def training_dict(self) -> dict[str, Any]:
        """The training sections as plain data, in ``config.yaml``'s order (validated with the job, not again)."""
        data = self.model_dump(mode="json", include=set(TRAINING_SECTIONS))
        return {k: data[k] for k in TRAINING_SECTIONS if k in data}

    def config_yaml(self) -> str:
        """``config.yaml``: what every task of the run trains from."""
        return yaml.safe_dump(self.training_dict(), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        order = ["name", "resources", *TRAINING_SECTIONS]
        return {k: data[k] for k in order if k in data}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------- checks


def check_resources(res: Resources, profile: ClusterProfile) -> list[tuple[str, str]]:
    """Requests the cluster cannot satisfy, as (dotted path, message)."""
    errors: list[tuple[str, str]] = []
    p = f"cluster {profile.name!r}"
    if profile.max_nodes is not None and res.nodes > profile.max_nodes:
        errors.append(("resources.nodes", f"{res.nodes} nodes requested; {p} allows at most {profile.max_nodes}"))
    if res.gpus_per_node > profile.gpus_per_node:
        have = f"{profile.gpus_per_node} GPUs per node" if profile.gpus_per_node else "no GPUs"
        errors.append(("resources.gpus_per_node", f"{res.gpus_per_node} GPUs per node requested; {p} has {have}"))
    if res.gpus_per_node and res.tasks_per_node is not None and res.tasks_per_node != res.gpus_per_node:
        errors.append(("resources.tasks_per_node", f"{res.tasks_per_node} tasks per node with {res.gpus_per_node} "
                       "GPUs per node; one task drives one GPU, so they must be equal (or leave tasks_per_node unset)"))
    gres = gres_gpus(res.gres) if res.gres else None
    if gres is not None and gres != res.gpus_per_node:
        errors.append(("resources.gres", f"{res.gres!r} asks for {gres} GPU(s) per node but resources.gpus_per_node "
                                         f"is {res.gpus_per_node}; set them equal (one task drives one GPU)"))
    cpus = res.ntasks_per_node * (res.cpus_per_task or 1)
    if profile.cpus_per_node is not None and cpus > profile.cpus_per_node:
        where = "resources.cpus_per_task" if res.cpus_per_task else "resources.tasks_per_node"
        errors.append((where, f"{res.ntasks_per_node} tasks x {res.cpus_per_task or 1} CPUs = {cpus} CPUs per node; "
                              f"{p} has {profile.cpus_per_node}"))
    if res.mem_gb is not None and profile.mem_per_node_gb is not None and res.mem_gb > profile.mem_per_node_gb:
        errors.append(("resources.mem", f"{res.mem} per node requested; {p} nodes have {profile.mem_per_node_gb:g}G"))
    if res.signal_delay_s >= res.time_minutes * 60:
        errors.append(("resources.signal_delay_s", f"{res.signal_delay_s} s is not shorter than the time limit "
                       f"({res.time_minutes} min); the job would be signalled as it starts"))
    return errors


@dataclass
class JobCheck:
    """Every problem of a schema-valid job, and the model its checks built on the meta device (None when they
    stopped before it), which the checkpoint-space estimate shares."""

    problems: list[Problem] = field(default_factory=list)
    meta: MetaModel | None = None


def check_training(spec: JobSpec, world_size: int | None = None, manifest: Manifest | None = None) -> JobCheck:
    """Consistency of the training sections with the ranks that will run, and the config against its shard set.

    ``world_size`` is the number of ranks that will really run (default: ``resources``' nodes x tasks);
    ``manifest``: the shard set's, when the caller has loaded it already (else it is loaded here, once).
    """
    from lenstrain.run.preflight import run_preflight
    from shards.manifest import ManifestError, load_manifest

    errors: list[Problem] = []
    world_size = spec.resources.world_size if world_size is None else world_size
    if spec.parallel.strategy == "single" and world_size > 1:
        errors.append(("parallel.strategy", f"'single' runs one process, but {world_size} ranks would run; "
                       "valid choices: ddp, deepspeed (or set resources.nodes=1, resources.tasks_per_node=1)"))
    if spec.parallel.backend == "nccl" and spec.resources.gpus_per_node == 0:
        errors.append(("parallel.backend", "nccl needs GPUs (resources.gpus_per_node is 0); valid choices: auto, gloo"))
    if manifest is None:
        try:
            manifest = load_manifest(spec.data.shards)
        except (ManifestError, ValidationError) as exc:
            return JobCheck([*errors, ("data.shards", str(exc).splitlines()[0])])
    checked = run_preflight(spec, manifest, world_size=world_size)
    return JobCheck(errors + checked.problems, checked.meta)


def read_job(
    source: str | Path | dict, overrides: list[str] | None = None, *, base: Path | None = None
) -> tuple[JobSpec, ClusterProfile | None, list[tuple[str, str]]]:
    """Read a job file (or take a dict), apply ``--set`` overrides and validate its schema, once.

    Returns the job, its cluster profile (None when ``resources.cluster`` names none) and the
    profile's complaint about it, if any. A schema error raises :class:`ConfigError`. ``data.shards``
    and ``model.init_from`` are resolved against ``base`` (default: the current directory) and stored
    absolute, because the job runs elsewhere.
    """
    data = read_job_yaml(source) if not isinstance(source, dict) else source
    data = apply_overrides(data, _quote_times(overrides))
    spec = validated(JobSpec, data)
    base = Path.cwd() if base is None else Path(base)
    shards = Path(spec.data.shards)
    if not shards.is_absolute():
        spec.data.shards = (base / shards).resolve()
    if spec.model.init_from:  # fine-tuning's source: absolute too (its @best / @STEP kept)
        from lenstrain.checkpointing.finetune import parse_init_from

        path, which = parse_init_from(spec.model.init_from)
        if not path.is_absolute():
            spec.model.init_from = str((base / path).resolve()) + (f"@{which}" if which else "")
    if spec.resources.cluster not in list_profiles():
        known = ", ".join(list_profiles())
        problem = ("resources.cluster", f"unknown cluster profile {spec.resources.cluster!r}; valid choices: {known}")
        return spec, None, [problem]
    return spec, load_profile(spec.resources.cluster), []


def check_job(spec: JobSpec, profile: ClusterProfile | None, world_size: int | None = None,
              manifest: Manifest | None = None) -> list[Problem]:
    """Every problem of a schema-valid job: its requests against the cluster, and its training checks."""
    return job_check(spec, profile, world_size, manifest).problems


def job_check(spec: JobSpec, profile: ClusterProfile | None, world_size: int | None = None,
              manifest: Manifest | None = None) -> JobCheck:
    """:func:`check_job`, with the model its training checks built on the meta device."""
    checked = check_training(spec, world_size, manifest)
    if profile:
        checked.problems[:0] = check_resources(spec.resources, profile)
    return checked


def load_job(
    source: str | Path | dict, overrides: list[str] | None = None, *, base: Path | None = None, check_shards: bool = True
) -> tuple[JobSpec, ClusterProfile]:
    """Read and validate a job; every problem found raises one :class:`ConfigError`."""
    spec, profile, problems = read_job(source, overrides, base=base)
    if check_shards:
        problems += check_job(spec, profile)
    elif profile:
        problems += check_resources(spec.resources, profile)
    if problems:
        raise ConfigError(problems=problems)
    assert profile is not None
    return spec, profile
