"""A sweep file: the base job, the metric, the sampler and pruner, the budget and the search space.

Validated as strictly as a job (unknown keys rejected, every error names its dotted path). Each space key
is checked as a ``--set`` of the base job would be, with each end of its range and each of its choices.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from launcher.spec import JobSpec, read_job_yaml
from launcher.sweep.samplers import PRUNERS, SAMPLER_CLASSES, SAMPLERS, option_problems
from launcher.values import RunName
from lenstrain.config.schema import (
    ConfigError,
    apply_overrides,
    format_validation_error,
    read_yaml,
    validated,
)
from lenstrain.evaluation.metrics import mode_for
from shards.clikit import Problem

if TYPE_CHECKING:
    from launcher.clusters import ClusterProfile
    from shards.manifest import Manifest

KINDS = ("log_uniform", "uniform", "int", "choice")


class Distribution(BaseModel):
    """One space key: exactly one of ``log_uniform: [lo, hi]``, ``uniform: [lo, hi]`` (optional ``step``),
    ``int: [lo, hi]`` (optional ``step``, ``log``) or ``choice: [a, b, ...]``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    log_uniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = Field(None, min_length=1)
    step: float | None = Field(None, gt=0)
    log: bool = False

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, "int_range" if k == "int" else k) is not None)

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in KINDS if getattr(self, "int_range" if k == "int" else k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(KINDS)}" + (f" (got {', '.join(given)})" if given else "")
            )
        kind = given[0]
        if kind in ("log_uniform", "uniform", "int"):
            lo, hi = getattr(self, "int_range" if kind == "int" else kind)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ValueError(f"{kind}: [{lo}, {hi}] is not a range; give [low, high] with low < high")
            if (kind == "log_uniform" or self.log) and lo <= 0:
                raise ValueError(f"{kind}: a log scale needs low > 0 (got {lo})")
        if self.step is not None and kind not in ("uniform", "int"):
            raise ValueError(f"step applies to uniform and int ranges, not {kind}")
        if self.log and kind != "int":
            raise ValueError("log applies to int ranges (use log_uniform for floats)")
        if kind == "choice" and len({yaml.safe_dump(c) for c in self.choice}) != len(self.choice):
            raise ValueError("choice: the values must differ")
        return self

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        kind = self.kind
        if kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choice)
        if kind == "int":
            return optuna.distributions.IntDistribution(
                *self.int_range, step=int(self.step or 1), log=self.log
            )
        if kind == "log_uniform":
            return optuna.distributions.FloatDistribution(*self.log_uniform, log=True)
        return optuna.distributions.FloatDistribution(*self.uniform, step=self.step)

    def examples(self) -> list[Any]:
        """The values a ``--set`` check tries: each end of a range, each choice."""
        if self.kind == "choice":
            return list(self.choice)
        return list(getattr(self, "int_range" if self.kind == "int" else self.kind))


class SweepSpec(BaseModel):
    """A whole sweep file."""

    model_config = ConfigDict(extra="forbid")

    name: RunName | None = None
    base: Path = Field(description="a job file; its resources are each trial's")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE lines applied to the base job")
    metric: str | None = Field(None, description="default: the base job's checkpoint.best_metric")
    direction: Literal["minimize", "maximize"] | None = None
    sampler: Literal[tuple(SAMPLERS)] = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    pruner: Literal[tuple(PRUNERS)] = "median"
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    trials: int | None = Field(
        None, ge=1, description="finished trials the study ends with; grid: every combination"
    )
    parallel: int = Field(1, ge=1, description="trials running at once (the array's %limit)")
    seed: int = 0
    retries: int = Field(2, ge=0, description="re-runs of a trial whose worker died")
    space: dict[str, Distribution] = Field(min_length=1)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {key: dist.to_optuna() for key, dist in self.space.items()}

    def grid(self) -> dict[str, list]:
        return {key: list(dist.choice) for key, dist in self.space.items()}

    def grid_points(self) -> list[dict[str, Any]]:
        grid = self.grid()
        return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


# ------------------------------------------------------------------------------------ the base job


@dataclass
class BaseJob:
    """The sweep's base job, read and validated once: the job, its cluster profile (None when it names none),
    the profile's complaint, and its shard set's manifest, loaded once (None when it cannot be read here)."""

    spec: JobSpec
    profile: ClusterProfile | None
    problems: list[Problem] = field(default_factory=list)
    manifest: Manifest | None = None

    @classmethod
    def of(cls, spec: JobSpec, profile: ClusterProfile | None, problems: list[Problem]) -> BaseJob:
        """The job as :func:`launcher.spec.read_job` returns it, with its manifest loaded (once, here)."""
        from shards.manifest import ManifestError, load_manifest

        try:
            manifest = load_manifest(spec.data.shards)
        except (ManifestError, ValidationError) as exc:
            print(f"note: the sweep's model keys are checked at generic sizes and its metric against every target "
                  f"kind: {str(exc).splitlines()[0]}", file=sys.stderr)
            manifest = None
        return cls(spec, profile, list(problems), manifest)

    def shape(self) -> tuple[int, int, int]:
        """(in_channels, num_outputs, image_size) of the shard set where it can be read, else generic ones (a
        model option such as norm does not depend on them)."""
        from lenstrain.run.build import task_for

        if self.manifest is None:
            return 1, 1, 64
        try:
            task = task_for(self.spec, self.manifest)
        except (KeyError, ValueError):  # a target the set lacks: the job's own checks name it
            return 1, 1, 64
        shape = self.manifest.image.shape
        return shape[0], task.num_outputs, shape[1]


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``a.b.c``, as ``--set a.b.c=...`` would (sections created as needed)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(problems=[(key, f"{part!r} is not a section")])
        node = child
    node[parts[-1]] = value


def with_params(job: dict, params: dict[str, Any]) -> dict:
    """A copy of the job dict with each dotted parameter set."""
    out = yaml.safe_load(yaml.safe_dump(job))
    for key, value in params.items():
        set_dotted(out, key, value)
    return out


def find_base(base: Path, sweep_file: Path | None) -> Path | None:
    """The base job file: as given (relative to the current directory), else beside the sweep file."""
    candidates = (
        [base]
        if base.is_absolute()
        else [Path.cwd() / base] + ([sweep_file.parent / base] if sweep_file else [])
    )
    return next((p.resolve() for p in candidates if p.is_file()), None)


def corners(spec: SweepSpec) -> list[dict[str, Any]]:
    """The space's examples laid side by side: corner i sets every key to its i-th example (its last one when it
    has fewer), so that each end of each range and each choice stands in one corner."""
    examples = {key: dist.examples() for key, dist in spec.space.items()}
    count = max(len(values) for values in examples.values())
    return [{key: values[min(i, len(values) - 1)] for key, values in examples.items()} for i in range(count)]


def space_problems(spec: SweepSpec, base: BaseJob) -> list[Problem]:
    """Each space key checked with each of its example values, as a ``--set`` of the base job, and each
    ``model.*`` key built into the model: one validation (and one model) per corner of the space
    (:func:`corners`), every key at once. Only a corner that fails is checked again key by key, to name the key."""
    problems = [(f"space.{key}", f"grid takes choice lists only; this is a {dist.kind} range")
                for key, dist in spec.space.items() if spec.sampler == "grid" and dist.kind != "choice"]
    job = base.spec.to_dict()
    model_keys = [key for key in spec.space if key.startswith("model.")]
    for corner in corners(spec):
        trial = with_params(job, corner)
        if _job_problems(trial, None) or (model_keys and _model_problem(trial, base)):
            return problems + _key_problems(spec, base, job)
    return problems


def _key_problems(spec: SweepSpec, base: BaseJob, job: dict) -> list[Problem]:
    """The problems of each space key alone: its first bad value, as a ``--set`` and (``model.*``) built."""
    problems: list[Problem] = []
    for key, dist in spec.space.items():
        for value in dist.examples():
            trial = with_params(job, {key: value})
            found = _job_problems(trial, (key, value))
            if not found and key.startswith("model."):
                model = _model_problem(trial, base)
                found = [(f"space.{key}", f"{model} (value {value!r})")] if model else []
            if found:
                problems += found
                break
    return problems


def _job_problems(trial: dict, named: tuple[str, Any] | None) -> list[Problem]:
    """The trial job's schema problems, under ``space.``; ``named``: the one key set, and its value."""
    try:
        JobSpec.model_validate(trial)
    except ConfigError as exc:
        return [(f"space.{path}", msg) for path, msg in exc.problems]
    except ValidationError as exc:
        if named is None:
            return [("space", "invalid")]
        key, value = named
        lines = format_validation_error(exc, JobSpec).splitlines()[1:]
        mine = [line.strip() for line in lines if line.strip().startswith(f"{key}:")] or [
            line.strip() for line in lines]
        return [(f"space.{line.split(': ', 1)[0]}", f"{line.split(': ', 1)[-1]} (value {value!r})") for line in mine]
    return []


def _model_problem(trial: dict, base: BaseJob) -> str | None:
    """Why the trial's model cannot be built (on the meta device) with its ``model.*`` values, as ``submit``
    checks ``model.kwargs``: a norm of ``foo`` is refused here, not in the middle of the sweep."""
    from lenstrain.run.preflight import model_kwargs_problem

    in_channels, outputs, size = base.shape()
    model = trial.get("model") or {}
    return model_kwargs_problem(model.get("name", "alternet_tiny"), model.get("kwargs") or {}, in_channels,
                                outputs, size)


def option_checks(spec: SweepSpec) -> list[Problem]:
    return option_problems(
        SAMPLER_CLASSES[spec.sampler], spec.sampler_options, "sampler_options"
    ) + option_problems(PRUNERS[spec.pruner], spec.pruner_options, "pruner_options")


def resolve_metric(spec: SweepSpec, base: BaseJob) -> list[Problem]:
    """Fill in ``metric`` (the base job's checkpoint.best_metric) and ``direction`` (the metric's own)."""
    job = base.spec
    if spec.metric is None:
        spec.metric = job.checkpoint.best_metric
    if spec.metric is None:
        return [("metric", "required: the base job has no checkpoint.best_metric to default to")]
    measured = measured_metrics(base)
    if spec.metric not in measured:
        return [("metric", f"{spec.metric!r} is not a metric validation measures; valid choices: "
                           f"{', '.join(measured)}")]
    if spec.direction is None:
        mode = (job.checkpoint.best_mode if spec.metric == job.checkpoint.best_metric else None) or mode_for(
            spec.metric
        )
        if mode is None:
            return [
                (
                    "direction",
                    f"cannot tell the direction of {spec.metric!r}; set direction: minimize or maximize",
                )
            ]
        spec.direction = "maximize" if mode == "max" else "minimize"
    return []


def measured_metrics(base: BaseJob) -> list[str]:
    """The metrics a trial's validation records: those of the base job's target kind where its shard set can be
    read, else those of any kind."""
    from lenstrain.evaluation.metrics import metric_names

    job, manifest = base.spec, base.manifest
    target = manifest.targets.get(job.data.target or manifest.primary_target) if manifest else None
    kinds = [target.kind] if target else ["regression", "classification"]  # else: the job's own checks say why
    names = dict.fromkeys(m for kind in kinds for m in metric_names(kind))
    return [f"{job.data.val_split}/{m}" for m in names]


def budget_problems(spec: SweepSpec) -> list[Problem]:
    if spec.sampler != "grid":
        return (
            [] if spec.trials is not None else [("trials", "required key is missing (the number of trials)")]
        )
    if any(d.kind != "choice" for d in spec.space.values()):
        return []
    points = len(spec.grid_points())
    if spec.trials is None:
        spec.trials = points
    elif spec.trials > points:
        return [("trials", f"{spec.trials} trials, but the grid has {points} combinations")]
    return []


# ------------------------------------------------------------------------------------ reading


SWEEP_KEYS = tuple(SweepSpec.model_fields)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the sweep file (its own keys, ``space.*``) and those for the base job."""
    mine, base = [], []
    for item in overrides:
        (mine if item.split("=", 1)[0].split(".")[0] in SWEEP_KEYS else base).append(item)
    return mine, base


def read_sweep(path: Path, overrides: list[str] | None = None) -> tuple[SweepSpec, JobSpec, dict]:
    """Read and validate a sweep file; returns the sweep, its base job (overrides applied) and the job as a dict.

    Every problem found raises one :class:`ConfigError` (exit 2) naming its dotted path.
    """
    spec, base = load_sweep(path, overrides)
    return spec, base.spec, base.spec.to_dict()


def load_sweep(path: Path, overrides: list[str] | None = None) -> tuple[SweepSpec, BaseJob]:
    """:func:`read_sweep`, with the base job as :class:`BaseJob`: read, validated and its manifest loaded once."""
    from launcher.spec import read_job

    mine, base_sets = split_overrides(overrides or [])
    spec = _validated_sweep(path, mine)
    base_file = find_base(spec.base, path)
    if base_file is None:
        raise ConfigError(problems=[("base", f"{spec.base}: no such job file")])
    spec.base = base_file
    base = BaseJob.of(*read_job(read_job_yaml(base_file), [*spec.overrides, *base_sets]))
    problems = budget_problems(spec) + option_checks(spec) + resolve_metric(spec, base) + space_problems(spec, base)
    if problems:
        raise ConfigError(problems=problems)
    return spec, base


def _validated_sweep(path: Path, overrides: list[str]) -> SweepSpec:
    """The sweep file with its own ``--set`` items (``space.*`` keys are dotted themselves), validated."""
    data = read_yaml(path, not_a_mapping="the top level must be a mapping")
    data = apply_overrides(data, [item for item in overrides if not item.startswith("space.")])
    for item in (item for item in overrides if item.startswith("space.")):
        key, _, raw = item.partition("=")
        data.setdefault("space", {})[key.removeprefix("space.")] = yaml.safe_load(raw)
    return validated(SweepSpec, data)
