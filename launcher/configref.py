"""The config reference, ``launcher/docs/config.md``, generated from the pydantic models.

Every key of a job file (:class:`launcher.spec.JobSpec`), a sweep file (:class:`launcher.sweep.spec.SweepSpec`)
and a cluster profile (:class:`launcher.clusters.ClusterProfile`) with its type, default and description. A
key's text is its field's ``description``, else its line in :mod:`lenstrain.config.docs`.

    python -m launcher.configref           # print it
    python -m launcher.configref --write   # rewrite launcher/docs/config.md (a test fails when it is stale)
"""

from __future__ import annotations

import argparse
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REFERENCE = Path(__file__).resolve().parent / "docs" / "config.md"

# Descriptions of keys outside lenstrain's config (the job's own keys, the sweep file, the cluster profile)
# whose fields carry none.
EXTRA: dict[str, str] = {
    "job.name": "the run's name (runs/NAME/); default: submit --name, else the file's stem; never inherited "
                "from a base",
    "job.base": "a job file this one inherits from (deep merge; relative to this file); see Inheritance below",
    "job.resources": "what the job asks of the cluster (the launcher's; lenstrain train ignores it)",
    "job.resources.nodes": "nodes",
    "job.resources.gpus_per_node": "GPUs per node (one task each)",
    "job.resources.cpus_per_task": "CPUs per task (training sets one intra-op thread per CPU)",
    "job.resources.partition": "SLURM partition; default: the profile's",
    "job.resources.account": "SLURM account; default: the profile's",
    "job.resources.qos": "SLURM quality of service; default: the profile's",
    "job.resources.constraint": "SLURM node features, e.g. a100",
    "sweep.name": "the sweep's name (runs/NAME/); default: sweep --name, else the file's stem",
    "sweep.direction": "default: the metric's own direction",
    "sweep.sampler": "the Optuna sampler",
    "sweep.sampler_options": "keyword arguments of the sampler (checked against its signature)",
    "sweep.pruner": "the Optuna pruner (none: no pruning)",
    "sweep.pruner_options": "keyword arguments of the pruner (checked against its signature)",
    "sweep.seed": "the sampler's seed",
    "sweep.space": "dotted job key -> distribution; each checked as a --set of the base job would be",
    "sweep.space.*.log_uniform": "[low, high], sampled on a log scale",
    "sweep.space.*.uniform": "[low, high] (with step: a grid of that step)",
    "sweep.space.*.int": "[low, high] integers (with step, or log: true)",
    "sweep.space.*.choice": "a list of values (grid takes only these)",
    "sweep.space.*.step": "the step of a uniform or int range",
    "sweep.space.*.log": "an int range on a log scale",
    "cluster.name": "the profile's name; default: the file's stem",
    "cluster.kind": "slurm, or local (no scheduler: tasks run as processes here)",
    "cluster.slurm_conf": "the slurm.conf to talk to (relative to the repository root); null: the cluster's own",
    "cluster.partition": "the default partition",
    "cluster.account": "the default account",
    "cluster.qos": "the default quality of service",
    "cluster.gpus_per_node": "GPUs per node",
    "cluster.cpus_per_node": "CPUs per node (null: not checked)",
    "cluster.mem_per_node_gb": "memory per node in GB (null: not checked)",
    "cluster.max_nodes": "nodes a job may take (null: not checked)",
    "cluster.setup": "shell lines run before srun in every job (module loads, environment)",
    "cluster.srun_args": "extra srun arguments for every job",
    "cluster.preempt_signal": "the signal SLURM sends before the time limit: USR2 or TERM",
}

INTRO = """\
# Config reference

Generated from the pydantic models by `python -m launcher.configref --write`; do not edit by hand
(`tests/test_config_reference.py` fails when this file is stale).

- A **job file** (`jobs/*.yaml`) is the training sections (`lenstrain train` reads them) plus the launcher's
  `name` and `resources`. Unknown keys are refused, naming the dotted path and the valid keys.
- `python -m launcher config JOB [--set KEY=VALUE ...]` prints a job resolved: its `base:` chain merged,
  the overrides applied and every default below filled in.
- Defaults marked *computed* depend on other keys or the environment; the description says how.

## Inheritance

`base: other.yaml` at the top of a job file makes it that job, deep-merged with its own keys: mappings merge
key by key at any depth (`model.kwargs` too) and any other value replaces the base's (a list whole; `null`
sets null). A base may have a base. `base` is relative to the file that names it; other paths
(`data.shards`, `model.init_from`) stay relative to the directory the command runs in. `name` is never
inherited. A chain that returns to a file is refused, naming the chain. (A sweep file's `base` is different:
the job its trials train.)
"""


def _fmt_type(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:  # a validated type (launcher.values): its base type is what a user writes
        return _fmt_type(args[0])
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, bool) else f"`{str(a).lower()}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_fmt_type(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_fmt_type(a) for a in args if a is not Ellipsis)
        name = {list: "list", tuple: "tuple", dict: "mapping"}[origin]
        return f"{name}[{inner}]" if inner else name
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        return {Path: "path", str: "string", int: "int", float: "float", bool: "bool"}.get(
            annotation, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _fmt_default(name: str, field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        if field.default_factory in (list, dict):
            return "`[]`" if field.default_factory is list else "`{}`"
        if isinstance(field.default_factory, type) and issubclass(field.default_factory, BaseModel):
            return "(section)"
        return "*computed*"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "*computed*" if name.endswith("mode") else "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:  # the sweep's space: key -> Distribution
        return None
    for arg in typing.get_args(annotation):
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def describe(key: str, field, extra_prefix: str) -> str:
    from lenstrain.config.docs import DESCRIPTIONS

    text = field.description or EXTRA.get(f"{extra_prefix}.{key}") or DESCRIPTIONS.get(key) or ""
    return " ".join(text.split()).replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = "", extra_prefix: str = "job") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key of ``model``, nested sections after their key."""
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        dotted = f"{prefix}{key}"
        out.append((dotted, _fmt_type(field.annotation), _fmt_default(name, field), describe(dotted, field, extra_prefix)))
        sub = _sub_model(field.annotation)
        if sub is not None:
            out += rows(sub, f"{dotted}.", extra_prefix)
    return out


def _table(items: list[tuple[str, str, str, str]]) -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {text} |" for k, t, d, text in items]
    return "\n".join(lines)


def job_rows() -> list[tuple[str, str, str, str]]:
    from launcher.spec import JobSpec

    items = rows(JobSpec)
    base = ("base", "path", "`null`", EXTRA["job.base"])
    return [items[0], base, *items[1:]] if items and items[0][0] == "seed" else [base, *items]


def missing_descriptions() -> list[str]:
    """Keys of a job, a sweep or a profile without a description anywhere (a test keeps this empty)."""
    from launcher.clusters import ClusterProfile
    from launcher.sweep.spec import Distribution, SweepSpec

    found = [k for k, _, _, text in job_rows() if not text]
    found += [f"sweep {k}" for k, _, _, text in rows(SweepSpec, extra_prefix="sweep") if not text]
    found += [f"sweep space.*.{k}" for k, _, _, text in rows(Distribution, extra_prefix="sweep.space.*") if not text]
    found += [f"cluster {k}" for k, _, _, text in rows(ClusterProfile, extra_prefix="cluster") if not text]
    return found


def render() -> str:
    from launcher.clusters import ClusterProfile
    from launcher.sweep.spec import Distribution, SweepSpec

    job = job_rows()
    sections: dict[str, list] = {}
    for item in job:
        top = item[0].split(".")[0]
        sections.setdefault(top if "." in item[0] or item[1] == "section" else "(top level)", []).append(item)
    parts = [INTRO, "## A job file\n"]
    for title, items in sections.items():
        parts.append(f"### `{title}`\n" if title != "(top level)" else "### Top level\n")
        parts.append(_table(items) + "\n")
    parts.append("## A sweep file (`jobs/sweeps/*.yaml`)\n")
    parts.append(_table(rows(SweepSpec, extra_prefix="sweep")) + "\n")
    parts.append("### A distribution in `space` (exactly one of `log_uniform`, `uniform`, `int`, `choice`)\n")
    parts.append(_table([(f"space.KEY.{k}", t, d, text) for k, t, d, text in
                         rows(Distribution, extra_prefix="sweep.space.*")]) + "\n")
    parts.append("## A cluster profile (`slurm/clusters/NAME.yaml`, see `python -m launcher clusters`)\n")
    parts.append(_table(rows(ClusterProfile, extra_prefix="cluster")) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.configref", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {REFERENCE}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(text)
        print(f"wrote {REFERENCE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
