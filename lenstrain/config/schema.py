"""Typed training configuration, validated at the edge.

A config file holds the training sections of a job: ``seed data model optim schedule train parallel
checkpoint log``. A whole job file from ``jobs/`` is accepted too: its ``resources`` section belongs
to the launcher and is ignored here. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError`, whose message names each dotted path and the valid choices.
"""

from __future__ import annotations

import copy
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lenstrain.data.normalize import NORMALIZERS
from lenstrain.evaluation.metrics import mode_for
from lenstrain.optimization.losses import LOSSES
from lenstrain.optimization.optimizers import OPTIMIZERS, SCHEDULES
from shards.clikit import UsageError

LAUNCHER_SECTIONS = ("resources", "name")
M = TypeVar("M", bound=BaseModel)


class ConfigError(UsageError):
    """A configuration that cannot be used; the message is meant for the user, verbatim. Exit status 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _infer_mode(section: type[Section], data: Any, metric_key: str, mode_key: str) -> Any:
    """Fill in a missing ``mode_key`` from the direction of the metric (min for a loss, max for AUC...)."""
    if isinstance(data, dict) and data.get(mode_key) is None:
        metric = data.get(metric_key, section.model_fields[metric_key].default)
        data = {**data, mode_key: (mode_for(metric) if isinstance(metric, str) else None) or "min"}
    return data


MODE_HELP = "min or max; default: the metric's own direction (min for loss, mse, mae; max for r2, accuracy, auc)"


class AugmentConfig(Section):
    rotate: bool = True  # any angle: lensing labels are rotation invariant
    flip: bool = True
    device: Literal["auto", "cpu", "device"] = Field("auto", description=(
        "where rotations and flips run: cpu: in the loader workers; device: in the training process, batched on "
        "its device (the CPU on a CPU run), the workers only gathering bytes; auto: device when training on a "
        "GPU, else cpu. The per-sample draws are the same either way"))


class StreamConfig(Section):
    """``data.stream``: training samples simulated in the loader workers, never the same one twice.

    Sample ``k`` of the stream is sample ``k`` of ``python -m shards simulate --preset PRESET --task TASK
    --seed SEED`` with ``options``, so each is a pure function of (seed, k). ``options`` are checked as that
    command checks its flags (:mod:`lenstrain.data.stream`), and the stream's images must agree with the shard set
    (``data.shards``), which still gives validation, test and the pixel and target statistics."""

    preset: str = Field(description="a preset of `shards simulate --preset` (deeplense1/2/3, model1, euclid, hst)")
    task: str = Field(description="a task of `shards simulate --task` (substructure, halo_mass, ...)")
    seed: int = Field(ge=0, description="the simulation seed; sample k is a pure function of (seed, k). It must "
                                        "differ from the seed the shard set was simulated with")
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "physics options of `shards simulate`, by name without the dashes: {lens: drawn, source_mag: [22.5, 24.5],"
        " size: 64, ...}; a range is a list [LOW, HIGH] or one number"))
    epoch_size: int = Field(ge=1, description="samples per epoch: what train.epochs, schedules, logs and "
                                              "checkpoints count in")
    auxiliary: Literal["none", "smooth"] = Field("none", description=(
        "smooth: each training sample also carries its smooth lens (the same main lens and source, no "
        "substructure, no noise, normalised as the image) as an auxiliary target, for a model that predicts it "
        "(smooth_residual_net); its MSE, weighted by train.auxiliary_weight, is added to the loss"))


class DataConfig(Section):
    shards: Path
    stream: StreamConfig | None = Field(None, description=(
        "train on fresh simulations instead of the train split of data.shards (validation and test still "
        "come from data.shards)"))
    batch_size: int = Field(32, ge=1, description="per rank, per micro-step")
    workers: int = Field(2, ge=0)
    worker_kind: Literal["thread", "process"] = Field("thread", description=(
        "thread: loader workers are threads of the training process (no copy between processes); "
        "process: DataLoader worker processes, each batch handed over in shared memory. Default: thread, "
        "or process with data.stream (rendering holds the GIL)"))
    prefetch: int = Field(2, ge=1)
    target: str | None = None  # default: the shard set's primary target
    target_scaling: Literal["standard", "minmax", "none"] = "standard"
    normalize: Literal[tuple(NORMALIZERS)] = Field("global", description=(
        "global: subtract the train split's pixel mean and divide by its std (from the manifest); "
        "per_image_max: divide each image by its own maximum (as DeepLense's data sets are stored); "
        "per_image_std: subtract each image's own mean and divide by its own std; "
        "asinh: asinh(image / the train split's pixel std), which compresses bright pixels and keeps faint ones "
        "linear; none: the pixels as stored. Old configs' true and false read as global and none"))
    augment: AugmentConfig = AugmentConfig()
    val_split: str = "val"
    val_batch_size: int | None = Field(None, ge=1)
    keep_global_batch: bool = True  # on a resume with another world size

    @model_validator(mode="before")
    @classmethod
    def _stream_workers(cls, data: Any) -> Any:
        """A stream renders in Python (lenstronomy), which holds the GIL: its workers are processes unless the
        config says otherwise."""
        if isinstance(data, dict) and data.get("stream") is not None and data.get("worker_kind") is None:
            data = {**data, "worker_kind": "process"}
        return data

    @field_validator("normalize", mode="before")
    @classmethod
    def _boolean_normalize(cls, value: Any) -> Any:
        if isinstance(value, bool):  # the switch it used to be
            return "global" if value else "none"
        return value


class ModelConfig(Section):
    name: str = "alternet_tiny"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False
    # fine-tuning (lenstrain.checkpointing.finetune)
    init_from: str | None = Field(None, description=(
        "fine-tuning: start from these weights: RUN_DIR (its newest complete checkpoint), RUN_DIR@best, "
        "RUN_DIR@STEP, or FILE.safetensors / FILE.pt (lenstrain export); only the weights, the optimizer starts "
        "fresh; a relative path is relative to the directory the command runs in (the launcher stores it absolute)"))
    init_skip: list[str] = Field(default_factory=list, description=(
        "fine-tuning: glob patterns of parameter names that keep their fresh initialisation, e.g. ['fc.*'] for "
        "a new head"))
    init_strict: bool = Field(True, description=(
        "fine-tuning: every parameter outside init_skip must come from init_from with its shape, and nothing "
        "else; false: load what fits and report the rest"))

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
            raise ValueError(f"{value!r}: a path without control characters, e.g. runs/pretrain@best")
        return value

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from lenstrain.models import list_models

        known = list_models()
        if name not in known:
            raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(known)}")
        return name


class OptimConfig(Section):
    name: Literal[tuple(OPTIMIZERS)] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    l1: float = Field(0.0, ge=0, description="L1 penalty on weights, added to the loss")
    l2: float = Field(0.0, ge=0, description="L2 penalty on weights, added to the loss")


class ScheduleConfig(Section):
    name: Literal[tuple(SCHEDULES)] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    step_size: int = Field(1000, ge=1)  # step schedule
    gamma: float = Field(0.1, gt=0, le=1)  # step schedule
    pct_start: float = Field(0.3, gt=0, lt=1)  # one-cycle
    factor: float = Field(0.5, gt=0, lt=1)  # plateau
    patience: int = Field(2, ge=0)  # plateau, in validations
    metric: str = "val/loss"  # plateau
    mode: Literal["min", "max"] = Field(None, description="plateau: " + MODE_HELP)

    @model_validator(mode="before")
    @classmethod
    def _mode_from_metric(cls, data: Any) -> Any:
        return _infer_mode(cls, data, "metric", "mode")


class EarlyStoppingConfig(Section):
    metric: str = "val/loss"
    mode: Literal["min", "max"] = Field(None, description=MODE_HELP)
    patience: int = Field(5, ge=1, description="validations without improvement")
    min_delta: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _mode_from_metric(cls, data: Any) -> Any:
        return _infer_mode(cls, data, "metric", "mode")


class ProfileConfig(Section):
    start_step: int = Field(5, ge=0, description="the step after which tracing starts")
    steps: int = Field(5, ge=1, description="steps traced")
    memory: bool = False  # a CUDA memory snapshot of those steps (GPU only)


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    loss: Literal[("auto", *LOSSES)] = "auto"
    huber_delta: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(10, ge=0)
    deterministic: bool = False
    val_every_steps: int = Field(0, ge=0, description="0: validate at the end only")
    early_stopping: EarlyStoppingConfig | None = None
    tta_rotations: int = Field(1, ge=1, description="test-time rotation averaging in eval")
    auxiliary_weight: float = Field(1.0, ge=0, description=(
        "weight of the auxiliary target's MSE in the training loss (with data.stream.auxiliary)"))
    profile: ProfileConfig | None = None  # torch.profiler traces of a window of steps, in RUN/profile/

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs")
        return self


class ParallelConfig(Section):
    strategy: Literal["single", "ddp", "deepspeed"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    zero_stage: int = Field(1, ge=0, le=3)  # deepspeed
    offload_optimizer: bool = False  # deepspeed
    find_unused_parameters: bool = False
    timeout_s: float = Field(600, gt=0, description="seconds a collective waits for every rank before the run fails")


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=0, description="0: off")
    every_minutes: float | None = Field(30.0, gt=0)
    keep: int = Field(3, ge=1)
    best_metric: str | None = "val/loss"
    best_mode: Literal["min", "max"] = Field(None, description=MODE_HELP)

    @model_validator(mode="before")
    @classmethod
    def _mode_from_metric(cls, data: Any) -> Any:
        return _infer_mode(cls, data, "best_metric", "best_mode")


class LogConfig(Section):
    every_steps: int = Field(10, ge=1)
    images: bool = True
    console: bool = True
    peak_tflops: float | None = Field(None, gt=0, description="the device's dense peak, for perf/mfu")


class LenstrainConfig(Section):
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _compatible(self) -> LenstrainConfig:
        if self.model.channels_last and self.parallel.strategy == "deepspeed":
            # DeepSpeed broadcasts parameters as byte views, which needs contiguous weights.
            raise ValueError("model.channels_last is not supported with parallel.strategy 'deepspeed'; "
                             "set model.channels_last: false or use 'ddp'")
        self._check_auxiliary()
        contradictions = [_contradiction(*pair) for pair in self._metric_modes()]
        if any(contradictions):
            raise ValueError("\n  ".join(c for c in contradictions if c))
        return self

    def _check_auxiliary(self) -> None:
        stream = self.data.stream
        if stream is None or stream.auxiliary == "none":
            return
        from lenstrain.models import auxiliary_outputs, models_with_auxiliary

        if stream.auxiliary not in auxiliary_outputs(self.model.name):
            raise ValueError(f"data.stream.auxiliary: {stream.auxiliary!r} needs a model that predicts it; model.name "
                             f"{self.model.name!r} does not (models that do: "
                             f"{', '.join(models_with_auxiliary(stream.auxiliary))})")

    def _metric_modes(self) -> list[tuple[str, str | None, str, str]]:
        """(metric key, metric, mode key, mode) for each setting that judges a metric by a direction."""
        pairs = [("checkpoint.best_metric", self.checkpoint.best_metric, "checkpoint.best_mode",
                  self.checkpoint.best_mode),
                 ("schedule.metric", self.schedule.metric, "schedule.mode", self.schedule.mode)]
        es = self.train.early_stopping
        if es is not None:
            pairs.append(("train.early_stopping.metric", es.metric, "train.early_stopping.mode", es.mode))
        return pairs


def _contradiction(metric_key: str, metric: str | None, mode_key: str, mode: str) -> str | None:
    direction = mode_for(metric) if metric else None
    if direction is None or direction == mode:
        return None
    better = "higher" if direction == "max" else "lower"
    return f"{mode_key}: {mode!r} contradicts {metric_key} {metric!r} ({better} is better); use {direction} or leave it out"


# ---------------------------------------------------------------------------------------- loading


def read_yaml(path: str | Path, *, not_a_mapping: str = "the top level must be a mapping of sections") -> dict:
    """The YAML mapping in ``path``; :class:`ConfigError` for a missing file, bad YAML or another top level."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_yaml_text(read_text(path), path, not_a_mapping=not_a_mapping)


MAX_YAML_NODES = 100_000  # values in a config, aliases counted each time they are used


def read_text(path: Path) -> str:
    """A config file's text; :class:`ConfigError` naming it when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def parse_yaml_text(text: str, path: str | os.PathLike, *, loader=None,
                    not_a_mapping: str = "the top level must be a mapping of sections") -> dict:
    """The YAML mapping in ``text`` (read from ``path``, which errors name): safe tags only, and at most
    :data:`MAX_YAML_NODES` values (aliases expanded), so that a crafted file cannot exhaust memory or time."""
    try:
        data = (yaml.load(text, Loader=loader) if loader else yaml.safe_load(text)) or {}  # noqa: S506 - safe loaders
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except (RecursionError, ValueError, TypeError) as exc:  # nesting too deep; a value YAML cannot build
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {not_a_mapping}")
    if _too_large(data):
        raise ConfigError(f"{path}: holds more than {MAX_YAML_NODES:,} values (aliases counted each time they are "
                          f"used); no config is that large")
    return data


def _too_large(data: Any) -> bool:
    """Whether ``data`` has more than :data:`MAX_YAML_NODES` values, counting a shared value at each use."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple | set):
            stack.extend(node)
    return False


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides; values parse as YAML (``3e-4``, ``true``, ``[1,2]``)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            raise ConfigError(f"--set {key}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
        if _too_large(value):
            raise ConfigError(f"--set {key}: the value holds more than {MAX_YAML_NODES:,} values")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _field_choices(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The valid keys at ``loc`` (for an unknown key), walking nested models."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_of(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "",
                            where: str | os.PathLike | None = None) -> str:
    """``invalid config:`` (``invalid config in WHERE:``, naming the file) and one line per problem."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = prefix + ".".join(str(p) for p in loc) if loc else (prefix.rstrip(".") or "(top level)")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            choices = _field_choices(model, loc)
            msg = "unknown key" + (f"; valid keys: {', '.join(choices)}" if choices else "")
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"  {path}: {msg}" if loc or prefix else f"  {msg}")
    header = f"invalid config in {where}:" if where is not None else "invalid config:"
    return header + "\n" + "\n".join(lines)


def validated(model: type[M], data: Any, where: str | os.PathLike | None = None) -> M:
    """``model`` validated from ``data``; a :class:`ConfigError` names each key (and ``where``, the file, when
    given). The one way a config, a job or a sweep file is validated."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, where=where)) from None


def validate_config(data: dict, where: str | os.PathLike | None = None) -> LenstrainConfig:
    """The validated config; a :class:`ConfigError` names each key (and ``where``, the file, when given)."""
    return validated(LenstrainConfig, {k: v for k, v in data.items() if k not in LAUNCHER_SECTIONS}, where)


def read_config_file(path: str | Path) -> dict:
    """A config or job file as a mapping, with its ``base:`` chain merged in (:mod:`lenstrain.config.inherit`)."""
    from lenstrain.config.inherit import resolve_bases

    return resolve_bases(path, read_yaml, ConfigError)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> LenstrainConfig:
    """Read (a path, with its ``base:`` chain) or take (a dict) a config, apply ``--set`` overrides, and
    validate it. An error in a file names the file."""
    data = read_config_file(source) if not isinstance(source, dict) else source
    where = None if isinstance(source, dict) else source
    return validate_config(apply_overrides(data, overrides), where=where)


def dump_config(config: LenstrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
