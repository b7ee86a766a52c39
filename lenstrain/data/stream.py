"""Simulation in the loop: ``data.stream``, training samples rendered in the loader workers, none ever twice.

Sample ``k`` of a stream is sample ``k`` of ``python -m shards simulate --preset P --task T --seed S`` with the
stream's ``options`` as flags: a pure function of (seed, k). The stream's order is sequential
(:class:`~lenstrain.data.SequentialOrder`: position ``p`` of epoch ``e`` is sample ``e * epoch_size + p``), cut
into global batches and rank slices exactly like a shard set's, and the cursor is the same, so a resume (after
a signal or a SIGKILL, with the same or another world size) renders exactly the samples the uninterrupted run
would have, and no sample index comes back in another epoch, on another rank or after a resume.

The options are checked by ``shards simulate``'s own parser (:func:`stream_plan`): the flags are built from the
command's ``add_arguments``, each option is parsed as the flag of the same name would be, and the result goes
through the same :func:`~shards.simulate.cli.plan` as a simulated shard set, so a knob added to the simulator is
a stream option at once. A bad value is reported as ``data.stream.options.KEY`` with the command's own message.

The shard set (``data.shards``) still gives validation, test, the pixel statistics and the target scaling. The
stream must draw what it holds (:func:`manifest_problems`): the same image shape, task, targets and, for a
simulated set, the same instrument and physics, recorded in its manifest's ``source``; every difference is
named. Its seed must differ from the shard set's, whose validation and test images would otherwise be training
samples.
"""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lenstrain.data.loader import BatchFinisher, TargetTransform, batch_buffer
from lenstrain.data.normalize import like_image
from shards.clikit import Problem
from shards.pack import BadSample, _stored_image

PREFIX = "data.stream"
AUXILIARY = ("none", "smooth")  # data.stream.auxiliary: what else a stream batch may carry

# The `shards simulate` flags that describe a shard set rather than a sample (and those the stream has as keys
# of its own: preset, task, seed). The packing options are added to these from `add_pack_options` itself.
SET_FLAGS = ("task", "n", "preset", "instrument", "grid", "out")
# What the manifest's source records about the set rather than about how each sample is drawn.
SET_RECORD = ("kind", "generator", "task_description", "n", "seed", "val", "test", "stratify")


class _Refused(Exception):
    """What argparse would have printed before exiting 2."""


class _SimulateParser(argparse.ArgumentParser):
    """``shards simulate``'s parser, raising instead of exiting."""

    def error(self, message: str):
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise _Refused(message or f"exit {status}")


@lru_cache(maxsize=1)
def _parser() -> tuple[_SimulateParser, dict[str, argparse.Action], frozenset[str]]:
    """The parser of ``shards simulate``, its actions by option name (``source_mag`` for ``--source-mag``), and
    the option names a stream may set."""
    from shards.options import add_pack_options
    from shards.simulate.cli import add_arguments

    parser = _SimulateParser(prog="shards simulate", add_help=False)
    add_arguments(parser)
    packing = _SimulateParser(add_help=False)
    add_pack_options(packing, skip_bad=False)
    excluded = {a.dest for a in packing._actions} | set(SET_FLAGS)
    actions = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                actions[_key(flag)] = action
    allowed = frozenset(name for name, action in actions.items() if action.dest not in excluded and
                        name not in excluded)
    return parser, actions, allowed


def _key(name: str) -> str:
    return str(name).lstrip("-").replace("-", "_")


def _flag(action: argparse.Action) -> str:
    return next(f for f in action.option_strings if f.startswith("--"))


def _text(value) -> str:
    """A YAML value as it would be typed after its flag: a list as LOW,HIGH."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _argv(action: argparse.Action, value) -> list[str] | str:
    """The flag and its text for an option value, or the problem with it."""
    if action.nargs == 0:  # a switch: true sets it, false leaves it out
        if not isinstance(value, bool):
            return f"expected true or false (the switch {_flag(action)}), got {value!r}"
        return [_flag(action)] if value else []
    return [_flag(action), _text(value)]


def _detail(message: str) -> str:
    return re.sub(r"^argument [^:]+: ", "", message.strip())


@dataclass(frozen=True)
class StreamPlan:
    """A valid stream: what each sample is drawn from, and the ``shards simulate`` flags that say it."""

    config: object  # shards.simulate.physics.SimConfig
    flags: tuple[str, ...]  # --task T --preset P and the options, as `shards simulate` takes them (no seed)


def stream_plan(stream) -> tuple[StreamPlan | None, list[Problem]]:
    """Check ``data.stream`` (a :class:`~lenstrain.config.StreamConfig`) as ``shards simulate`` checks its flags;
    the plan of a valid stream, or the problems of an invalid one, each named by its dotted path."""
    from shards.simulate.cli import SimulateError, plan
    from shards.simulate.options import physics_overrides

    parser, actions, allowed = _parser()
    problems: list[Problem] = []
    head = _check_base(stream, parser, actions, problems)
    argv, given = _check_options(stream, parser, actions, allowed, head, problems)
    if problems:
        return None, problems
    args = parser.parse_args([*argv, *REQUIRED])
    physics = physics_overrides(args)
    takes = set(inspect.signature(plan).parameters) - {"task", "n", "seed", "preset", "physics", "instrument"}
    kwargs = {}
    for key, raw_key in given.items():
        dest = actions[key].dest
        if key in physics:
            continue
        if dest in takes:
            kwargs[dest] = getattr(args, dest)
        else:
            problems.append((f"{PREFIX}.options.{raw_key}", f"{_flag(actions[key])} is a flag of shards simulate that "
                             "the stream cannot apply per sample"))
    if problems:
        return None, problems
    try:
        config = plan(stream.task, 1, preset=stream.preset, physics=physics, seed=stream.seed, **kwargs)
    except SimulateError as exc:
        message = str(exc)  # a check across knobs names their flags: name the first one the stream gives
        named = [given[_key(flag)] for flag in re.findall(r"--[a-z0-9-]+", message) if _key(flag) in given]
        return None, [(f"{PREFIX}.options" + (f".{named[0]}" if named else ""), message)]
    return StreamPlan(config, tuple(argv)), []


REQUIRED = ["--n", "1", "--out", "-"]  # the flags simulate requires besides --task, with harmless values


def _check_base(stream, parser, actions: dict[str, argparse.Action], problems: list[Problem]) -> list[str]:
    """``--task T --preset P`` of the stream; a refused value is a problem, and a valid stand-in goes on."""
    base = {}
    for key, value in (("task", stream.task), ("preset", stream.preset)):
        chosen = actions[key]
        try:
            parser.parse_args([_flag(chosen), str(value), *_required(actions, skip=key)])
            base[key] = str(value)
        except _Refused as exc:
            problems.append((f"{PREFIX}.{key}", _detail(exc.args[0])))
            base[key] = next(iter(chosen.choices))  # to go on checking the options
    return ["--task", base["task"], "--preset", base["preset"]]


def _check_options(stream, parser, actions: dict[str, argparse.Action], allowed: set[str], head: list[str],
                   problems: list[Problem]) -> tuple[list[str], dict[str, str]]:
    """Each option checked alone as its ``shards simulate`` flag: the argv of the valid ones, and their keys."""
    argv, given = list(head), {}
    for raw_key, value in stream.options.items():
        key, path = _key(raw_key), f"{PREFIX}.options.{raw_key}"
        if key not in allowed:
            problems.append((path, f"is data.stream.{key}" if key in ("task", "preset", "seed") else
                             f"{_flag(actions[key])} describes a shard set, not a sample" if key in actions else
                             f"unknown option; valid options: {', '.join(sorted(allowed))}"))
            continue
        if key in given:
            problems.append((path, f"the same option as data.stream.options.{given[key]}"))
            continue
        if value is None:
            continue
        flag = _argv(actions[key], value)
        if isinstance(flag, str):
            problems.append((path, flag))
            continue
        try:
            parser.parse_args([*head, *REQUIRED, *flag])
        except _Refused as exc:
            problems.append((path, _detail(exc.args[0])))
            continue
        argv += flag
        given[key] = raw_key
    return argv, given


def _required(actions: dict[str, argparse.Action], skip: str) -> list[str]:
    """The other required flags, with harmless values, so that one flag can be checked alone."""
    out = []
    for key, value in (("task", None), ("n", "1"), ("out", "-")):
        if key != skip:
            out += [_flag(actions[key]), value if value is not None else next(iter(actions[key].choices))]
    return out


# ------------------------------------------------------------------------------------ against the shard set


def check_stream(cfg, manifest) -> tuple[StreamPlan | None, list[Problem]]:
    """``cfg.data.stream`` checked as ``shards simulate`` checks its flags, then against the shard set: its plan,
    and every problem found (none when the stream can train beside that shard set)."""
    planned, problems = stream_plan(cfg.data.stream)
    return planned, problems or manifest_problems(cfg, planned, manifest)



def manifest_problems(cfg, planned: StreamPlan, manifest) -> list[Problem]:
    """Each way the stream's samples differ from what the shard set holds, named by the key that decides it."""
    from shards.simulate.cli import _source_record
    from shards.simulate.tasks import get_task

    stream, sim = cfg.data.stream, planned.config
    problems: list[Problem] = []
    shape = (1, sim.instrument.size, sim.instrument.size)
    if tuple(manifest.image.shape) != shape:
        where = "options.size" if "size" in stream.options else "preset"
        problems.append((f"{PREFIX}.{where}", f"the stream renders images of {shape}, the shard set holds "
                         f"{tuple(manifest.image.shape)}"))
    task = get_task(sim.task)
    name = cfg.data.target or manifest.primary_target
    ours = {t.name: t for t in task.targets}
    if name in manifest.targets and name not in ours:
        problems.append((f"{PREFIX}.task", f"task {sim.task!r} has no target {name!r} (data.target); its targets: "
                         f"{', '.join(ours)}"))
    elif name in manifest.targets:
        theirs, mine = manifest.targets[name], ours[name]
        if theirs.kind != mine.kind or list(theirs.classes or []) != list(mine.classes or []):
            problems.append((f"{PREFIX}.task", f"target {name!r} is {_target(mine.kind, mine.classes)} in task "
                             f"{sim.task!r}, {_target(theirs.kind, theirs.classes)} in the shard set"))
    source = manifest.source or {}
    if source.get("kind") != "simulate":
        return problems
    record = _source_record(sim, task, 1, val=0.0, test=0.0)
    if problems and problems[0][1].startswith("the stream renders images of"):  # said once, not again as the size
        record["instrument"] = {k: v for k, v in record["instrument"].items() if k != "size"}
    problems += _record_problems(record, source)
    if source.get("seed") == stream.seed and source.get("task") == sim.task:
        problems.append((f"{PREFIX}.seed", f"{stream.seed} is the seed the shard set was simulated with: its "
                         f"validation and test images would be among the stream's first {source.get('n', '?')} samples; "
                         f"choose another"))
    return problems


def _target(kind: str, classes) -> str:
    return f"a {kind} target" + (f" of classes {list(classes)}" if classes else "")


def _record_problems(record: dict, source: dict) -> list[Problem]:
    """The differences between the manifest's ``source`` and the one a set of the stream's samples would record,
    each under the key that decides it: an option of that name, else the preset (or the task). A field the shard
    set predates (not in its record) is taken to agree."""
    _, _, allowed = _parser()

    def where(name: str, fallback: str) -> str:
        return f"{PREFIX}.options.{name}" if name in allowed else f"{PREFIX}{fallback}"

    problems: list[Problem] = []
    skip = {"preset"}
    if "preset" in source and record.get("preset") != source["preset"]:
        nested = [f"{part}.{k}" for part in ("instrument", "scenario")
                  for k in _differing(record.get(part), source.get(part))]
        problems.append((f"{PREFIX}.preset", f"{record.get('preset')!r}, but the shard set was simulated with preset "
                         f"{source['preset']!r}" + (f"; they differ in {', '.join(nested)}" if nested else "")))
        skip |= {"instrument", "scenario"}  # consequences of the preset, named above
    for field, ours in record.items():
        if field in SET_RECORD or field in skip or field not in source:
            continue
        theirs = source[field]
        if isinstance(ours, dict) and isinstance(theirs, dict):
            for key in _differing(ours, theirs):
                if field == "physics":
                    problems.append((PREFIX, f"the simulator's constant {key} is {ours[key]!r} now and was "
                                     f"{theirs[key]!r} when the shard set was simulated"))
                else:
                    problems.append((where(key, ".preset"), f"{field} {key}: the stream draws {ours[key]!r}, the "
                                     f"shard set was simulated with {theirs[key]!r}"))
        elif ours != theirs:
            fallback = ".task" if field in ("task", "classes") else ""
            problems.append((where(field, fallback), f"{field}: the stream has {ours!r}, the shard set {theirs!r}"))
    return problems


def _differing(ours, theirs) -> list[str]:
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return []
    return [k for k in ours if k in theirs and ours[k] != theirs[k]]


# ------------------------------------------------------------------------------------ rendering batches


class StreamBatchBuilder(BatchFinisher):
    """Renders whole training batches of a stream; picklable, so worker processes run it.

    Each image is stored as the shard set stores its own (its dtype: float16 sets are rounded the same way)
    and read back as float32; the targets are encoded from the sample's labels with the shard set's scaling;
    augmentation and normalisation are :class:`~lenstrain.data.BatchFinisher`'s, with the shard set's pixel
    statistics. So training images are prepared exactly as the shard set's validation images are.
    """

    def __init__(self, planned: StreamPlan, target: TargetTransform, *, dtype: str, seed: int, normalize: str,
                 mean: float, std: float, rotate: bool, flip: bool, augment_device: str = "cpu",
                 auxiliary: str = "none"):
        from shards.simulate.physics import Simulator

        if auxiliary not in AUXILIARY:
            raise ValueError(f"auxiliary {auxiliary!r}; valid: {', '.join(AUXILIARY)}")
        super().__init__(target, seed=seed, normalize=normalize, mean=mean, std=std, rotate=rotate, flip=flip,
                         augment_device="cpu" if auxiliary != "none" else augment_device)
        self.simulator = Simulator(planned.config)
        self.dtype = dtype
        self.auxiliary = auxiliary  # "smooth": each batch also carries "smooth", the image's smooth lens
        size = planned.config.instrument.size
        self.shape = (1, size, size)

    def warm(self) -> None:
        """Render one sample of each class here, so that worker processes forked later inherit the built
        lenstronomy models instead of each building them again."""
        for k in range(len(self.simulator.config.classes)):
            self.render(k)

    def render(self, index: int) -> tuple[np.ndarray, dict]:
        """Sample ``index`` as the shard set would store it, and its labels."""
        image, labels = self.simulator(int(index))
        try:
            return _stored_image(np.asarray(image), self.dtype), labels
        except BadSample as exc:
            raise ValueError(f"stream sample {index} (seed {self.simulator.config.seed}): {exc}") from None

    def render_pair(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Sample ``index`` as :meth:`render` gives it, and its smooth version stored the same way."""
        image, smooth, labels = self.simulator.with_smooth(int(index))
        try:
            return _stored_image(np.asarray(image), self.dtype), _stored_image(smooth, self.dtype), labels
        except BadSample as exc:
            raise ValueError(f"stream sample {index} (seed {self.simulator.config.seed}): {exc}") from None

    def __call__(self, indices: np.ndarray, epoch: int | None) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        x = batch_buffer((len(indices), *self.shape))
        smooth = torch.empty(x.shape) if self.auxiliary == "smooth" else None
        out, smooth_out = x.numpy(), None if smooth is None else smooth.numpy()
        targets = np.empty(len(indices), dtype=np.float64)
        for k, index in enumerate(indices.tolist()):
            if smooth_out is None:
                image, labels = self.render(index)
            else:
                image, smooth_out[k], labels = self.render_pair(index)
            out[k] = image
            targets[k] = self.target.encode(labels)
        if smooth is None:
            return self.assemble(x, targets, indices, epoch)
        return self._with_smooth(x, smooth, targets, indices, epoch)

    def _with_smooth(self, x: torch.Tensor, smooth: torch.Tensor, targets: np.ndarray, indices: np.ndarray,
                     epoch: int | None) -> dict[str, torch.Tensor]:
        """The batch and its smooth images, turned and flipped by the same draws and normalised alike."""
        if epoch is not None and self.augment.enabled:
            both = self.augment.apply(torch.cat([x, smooth], dim=1), self.augment.params(indices, epoch))
            x, smooth = both[:, : x.shape[1]].contiguous(), both[:, x.shape[1]:].contiguous()
        smooth = like_image(smooth, x, self.normalize, self.mean, self.std)
        batch = self.assemble(x, targets, indices, None)  # augmented already: only normalised there
        batch["smooth"] = smooth
        return batch
