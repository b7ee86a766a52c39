"""Fine-tuning: a new run that starts from another run's weights (``model.init_from``).

``model.init_from`` is one of

- ``RUN_DIR``: that run's newest complete checkpoint;
- ``RUN_DIR@best``: its best checkpoint by its own ``checkpoint.best_metric``;
- ``RUN_DIR@STEP``: the checkpoint of step STEP;
- ``FILE.safetensors`` or ``FILE.pt``: weights written by ``lenstrain export`` (or any plain state dict).

Parameters whose names match a glob of ``model.init_skip`` keep their fresh initialisation (a new head when
the output width changes: ``[fc.*]``). With ``model.init_strict: true`` (the default) every other parameter
and buffer must be in the source with the same shape, and the source may hold nothing else; with ``false``
what fits is loaded and the rest reported. Only the weights come over: the optimizer, schedule, data cursor
and step start fresh. A run that resumes from its own checkpoint never reads ``init_from`` again.

The run prints a report (keys loaded, skipped, missing, unexpected, shape-mismatched) and writes it to
``RUN/init.json``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

INIT_REPORT = "init.json"
_AT = re.compile(r"^(?P<path>.+)@(?P<which>best|\d+)$")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


class InitError(ValueError):
    """``model.init_from`` cannot be used; the message names why."""


def parse_init_from(value: str) -> tuple[Path, str | None]:
    """``(path, which)``: ``which`` is ``best``, a step number as text, or None (the newest / the file)."""
    match = _AT.match(value)
    if match and not Path(value).exists():
        return Path(match.group("path")).expanduser(), match.group("which")
    return Path(value).expanduser(), None


def resolve_source(value: str) -> tuple[Path, str]:
    """The weights ``init_from`` names: a checkpoint directory or a weights file, and a phrase saying which."""
    from lenstrain.checkpointing.checkpoint import latest_complete, read_meta
    from lenstrain.checkpointing.rundir import RunDir

    path, which = parse_init_from(value)
    if path.is_file():
        if which is not None:
            raise InitError(f"{value!r}: @{which} applies to a run directory, not a file")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise InitError(f"{path}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a run directory")
        return path, f"the weights file {path}"
    if not path.is_dir():
        raise InitError(f"{path}: no such run directory or weights file")
    root = RunDir(path).checkpoints
    if not root.is_dir():
        raise InitError(f"{path}: not a run directory with checkpoints (no {root.name}/)")
    if which is None:
        found = latest_complete(root, log=lambda message: None)
        if found is None:
            raise InitError(f"{path}: no complete checkpoint to start from")
        return found, f"{path}, its newest checkpoint (step {read_meta(found)['step']})"
    return _best_source(path, root) if which == "best" else _step_source(path, root, which)


def _best_source(path: Path, root: Path) -> tuple[Path, str]:
    from lenstrain.checkpointing.checkpoint import best_checkpoint, list_checkpoints, read_meta

    metric, mode = _best_rule(path)
    found = best_checkpoint(root, metric, mode, verify=True) if metric else None
    if found is None:
        have = ", ".join(p.name for _, p in list_checkpoints(root)) or "none"
        raise InitError(f"{path}@best: no checkpoint records {metric or 'a best metric'} (checkpoints: {have}); "
                        f"name a step (RUN@STEP) or the newest (RUN)")
    return found, f"{path}, its best checkpoint by {metric} (step {read_meta(found)['step']})"


def _step_source(path: Path, root: Path, which: str) -> tuple[Path, str]:
    from lenstrain.checkpointing.checkpoint import list_checkpoints, step_dir_name
    from lenstrain.checkpointing.stateio import verify_checkpoint

    step_dir = root / step_dir_name(int(which))
    problem = verify_checkpoint(step_dir) if step_dir.is_dir() else "no such checkpoint"
    if problem is not None:
        have = ", ".join(str(s) for s, p in list_checkpoints(root) if verify_checkpoint(p) is None) or "none"
        raise InitError(f"{path}@{which}: {problem}; complete checkpoints at steps: {have}")
    return step_dir, f"{path}, its checkpoint of step {int(which)}"


def _best_rule(run_dir: Path) -> tuple[str | None, str]:
    from lenstrain.checkpointing.rundir import RunDir
    from lenstrain.config.schema import ConfigError, load_config

    try:
        cfg = load_config(RunDir(run_dir).config)
    except ConfigError as exc:
        raise InitError(f"{run_dir}@best: its config.yaml cannot be read ({str(exc).splitlines()[0]})") from None
    return cfg.checkpoint.best_metric, cfg.checkpoint.best_mode


def load_source_state(source: Path) -> dict[str, torch.Tensor]:
    """The plain state dict of a checkpoint directory (any backend) or a weights file."""
    from lenstrain.checkpointing.checkpoint import load_model_state
    from lenstrain.checkpointing.stateio import load_state_file

    if source.is_dir():
        return load_model_state(source)
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(source)
    state = load_state_file(source)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"{source}: not a plain state dict of tensors")
    return state


def source_shapes(source: Path) -> dict[str, tuple[int, ...]] | None:
    """The parameter shapes of a source without reading its tensors where the format allows (None: it does not)."""
    from lenstrain.checkpointing.stateio import load_state_file

    if source.is_file() and source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    model_pt = source / "model.pt" if source.is_dir() else source
    if model_pt.is_file():
        state = load_state_file(model_pt, map_location="meta")
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return None  # a DeepSpeed checkpoint: its shapes are checked when training starts


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # matched model.init_skip: freshly initialised
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model
    mismatched: list[str] = field(default_factory=list)  # "name: source (a, b) vs model (c, d)"

    def problems(self) -> list[str]:
        return [f"{what}: {', '.join(_short(keys))}" for what, keys in
                (("missing from the source", self.missing), ("not in the model", self.unexpected),
                 ("of another shape", self.mismatched)) if keys]

    def lines(self) -> list[str]:
        out = [f"initial weights from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} "
               f"re-initialised (model.init_skip), {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
               f"{len(self.mismatched)} shape-mismatched; optimizer state starts fresh"]
        for what, keys in (("re-initialised", self.skipped), ("missing (kept fresh)", self.missing),
                           ("unexpected (ignored)", self.unexpected), ("shape-mismatched (kept fresh)", self.mismatched)):
            if keys:
                out.append(f"  {what}: {', '.join(_short(keys))}")
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data["counts"] = {k: len(v) for k, v in data.items() if isinstance(v, list)}
        return data


def _short(keys: list[str], n: int = 8) -> list[str]:
    return keys[:n] + ([f"... {len(keys) - n} more"] if len(keys) > n else [])


def compare(model_shapes: dict[str, tuple[int, ...]], source_shapes: dict[str, tuple[int, ...]],
            skip: list[str], source: str) -> InitReport:
    """What loading a source of ``source_shapes`` into a model of ``model_shapes`` would do."""
    report = InitReport(source)

    def skipped(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in skip)

    for key, shape in model_shapes.items():
        if skipped(key):
            report.skipped.append(key)
        elif key not in source_shapes:
            report.missing.append(key)
        elif tuple(source_shapes[key]) != tuple(shape):
            report.mismatched.append(f"{key}: source {tuple(source_shapes[key])} vs model {tuple(shape)}")
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in source_shapes if k not in model_shapes and not skipped(k)]
    return report


def strict_message(report: InitReport) -> str:
    return ("the initial weights do not fit the model: " + "; ".join(report.problems())
            + ". List the parameters to re-initialise in model.init_skip (e.g. ['fc.*'] for a new head), "
              "or set model.init_strict: false to load what fits")


def load_initial_weights(model: torch.nn.Module, init_from: str, skip: list[str], strict: bool) -> InitReport:
    """Load the weights ``init_from`` names into ``model`` (in place); InitError when strict and they do not fit."""
    source, why = resolve_source(init_from)
    state = load_source_state(source)
    own = model.state_dict()
    report = compare({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()},
                     skip, why)
    if strict and report.problems():
        raise InitError(strict_message(report))
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(state[key].to(dtype=own[key].dtype))
    return report


def init_problems(init_from: str, skip: list[str], strict: bool,
                  model_shapes: Callable[[], dict[str, tuple[int, ...]] | None]) -> list[str]:
    """Why ``init_from`` cannot start this model, checked before any work (the source's shapes where cheap)."""
    try:
        source, why = resolve_source(init_from)
        shapes = source_shapes(source)
    except (InitError, OSError) as exc:
        return [str(exc)]
    except Exception as exc:  # noqa: BLE001 - a damaged file: say so, training would fail the same way
        return [f"{init_from}: cannot be read ({type(exc).__name__}: {exc})"]
    mine = model_shapes() if shapes is not None else None
    if shapes is None or mine is None:
        return []
    report = compare(mine, shapes, skip, why)
    if strict and report.problems():
        return [strict_message(report)]
    if not report.loaded:
        return [f"{why}: not one tensor fits this model (is it the same model.name?)"]
    return []
