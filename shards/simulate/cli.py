"""``python -m shards simulate``: simulate strong-lensing images with lenstronomy into a shard set."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from shards.argtypes import positive_float, positive_int
from shards.clikit import UsageError
from shards.manifest import Manifest
from shards.options import PackOptions, add_pack_options
from shards.pack import OutputExistsError, PackResult, pack_shard_set
from shards.simulate import physics
from shards.simulate.options import add_physics_arguments, physics_overrides
from shards.simulate.physics import SUBSTRUCTURE_CLASSES, SimConfig, Simulator, draw_params
from shards.simulate.presets import INSTRUMENTS
from shards.simulate.scenarios import PRESETS, resolve
from shards.simulate.tasks import TASKS, get_task
from shards.splits import stratified_split


class SimulateError(ValueError):
    """Bad arguments to :func:`simulate` (the command line turns it into exit status 2)."""


def _physics_record() -> dict:
    """The distributions in force, recorded in the manifest's source."""
    names = [n for n in dir(physics) if n.isupper() and not n.startswith(("STREAM", "_"))]
    out = {}
    for name in names:
        value = getattr(physics, name)
        if isinstance(value, (int, float, str)):
            out[name.lower()] = value
        elif isinstance(value, tuple):
            out[name.lower()] = list(value)
    return out


def plan(
    task: str,
    n: int,
    *,
    instrument: str = "model1",
    size: int | None = None,
    pixel_scale: float | None = None,
    seed: int = 0,
    preset: str | None = None,
    physics: dict | None = None,
) -> SimConfig:
    """Validate the arguments and return the configuration every sample is drawn from.

    ``preset`` (default: ``instrument``, a realistic preset) names a scenario of
    :data:`~shards.simulate.scenarios.PRESETS`; ``physics`` overrides its knobs (name -> value).
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise SimulateError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SimulateError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        spec = get_task(task)
        if preset is None and instrument not in INSTRUMENTS:
            raise SimulateError(f"unknown instrument {instrument!r}; valid choices: {', '.join(INSTRUMENTS)}")
        name = preset or instrument
        inst, phys = resolve(name, spec.name, physics or {}, size=size, pixel_scale=pixel_scale)
    except ValueError as exc:
        raise SimulateError(str(exc)) from None
    return SimConfig(
        task=spec.name,
        classes=spec.classes,
        instrument=inst,
        seed=int(seed),
        task_code=spec.code,
        physics=phys,
        preset=name,
    )


def split_plan(config: SimConfig, n: int, *, val: float, test: float) -> tuple[list[str], np.ndarray]:
    """The split of each sample, stratified by class or by quantile bins of the primary target.

    Only parameters are drawn here (no rendering), so this is quick even for large ``n``.
    """
    task = get_task(config.task)
    name = task.primary.name
    if name == "substructure":  # the class follows from the index
        strata = np.asarray(
            [SUBSTRUCTURE_CLASSES.index(config.class_of(i)) for i in range(n)], dtype=np.float64
        )
    else:
        strata = np.asarray([draw_params(config, i)[name] for i in range(n)], dtype=np.float64)
    try:
        split_of = stratified_split(strata, val=val, test=test, seed=config.seed, regression=task.regression)
    except ValueError as exc:
        raise SimulateError(str(exc)) from None
    return list(split_of), strata


def simulate(
    task: str, n: int, out: str | os.PathLike, *, instrument: str = "model1", size: int | None = None,
    pixel_scale: float | None = None, seed: int = 0, workers: int = 1, val: float = 0.1, test: float = 0.1,
    shard_size: int = 1000, dtype: str = "float32", overwrite: bool = False, grid: str | os.PathLike | None = None,
    result: bool = False, preset: str | None = None, physics: dict | None = None,
) -> Manifest | PackResult:
    """Simulate ``n`` images for ``task`` into a shard set at ``out`` and return its manifest.

    Each sample is a pure function of ``(seed, task, index)``, so the shards are byte-identical for any
    ``workers``. ``grid`` writes a PNG of sample images per class. ``result=True`` returns the whole
    :class:`~shards.pack.PackResult` instead of the manifest. ``preset`` and ``physics`` as in :func:`plan`.
    """
    config = plan(task, n, instrument=instrument, size=size, pixel_scale=pixel_scale, seed=seed, preset=preset,
                  physics=physics)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if workers < 1:
        raise SimulateError(f"workers must be at least 1, got {workers}")
    split_of, _ = split_plan(config, n, val=val, test=test)
    spec = get_task(task)
    packed = pack_shard_set(
        out,
        sample_fn=Simulator(config),
        split_of=split_of,
        targets=spec.targets,
        primary_target=spec.primary.name,
        source=_source_record(config, spec, n, val=val, test=test),
        options=PackOptions(val=val, test=test, seed=seed, shard_size=shard_size, dtype=dtype, workers=workers,
                            overwrite=overwrite),
        desc=f"simulate {spec.name}",
    )
    if grid is not None:
        _write_grid(out, grid, packed.manifest)
    return packed if result else packed.manifest


def _write_grid(out: Path, grid: str | os.PathLike, manifest: Manifest) -> Path:
    """A PNG of 8 images per class (or spanning the target) from the training split, or the first there is."""
    from shards.grid import write_grid

    return write_grid(out, grid, per_class=8, split="train" if "train" in manifest.splits else next(iter(manifest.splits)))


def _source_record(config, spec, n: int, *, val: float, test: float) -> dict:
    """The manifest's ``source``: what was simulated, with which physics and which software."""
    import lenstronomy

    return {
        "kind": "simulate",
        "generator": f"lenstronomy {lenstronomy.__version__}",
        "task": spec.name,
        "task_description": spec.description,
        "classes": list(spec.classes),
        "n": int(n),
        "seed": config.seed,
        "preset": config.preset,
        "instrument": config.instrument.as_dict(),
        "scenario": config.physics.as_dict(),
        "val": val,
        "test": test,
        "stratify": "class" if not spec.regression else f"quantiles of {spec.primary.name}",
        "physics": _physics_record(),
    }


# --------------------------------------------------------------------------------------------- command line
def _size(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8 pixels, got {value}")
    return value


def _instrument_help() -> str:
    return "; ".join(f"{name}: {inst.description}" for name, inst in INSTRUMENTS.items())


HELP = "simulate strong-lensing images (lenstronomy) into a shard set"


def description() -> str:
    tasks = "; ".join(f"{name}: {t.description}" for name, t in TASKS.items())
    return (
        "Simulate galaxy-galaxy strong-lensing images with lenstronomy (SIE + external shear "
        "lensing a Sersic source, Gaussian PSF, Poisson + sky + read noise) with dark-matter "
        "substructure (no_sub, cdm, vortex, axion), and pack them into a shard set. Each sample is "
        "a pure function of (seed, task, index): the same seed gives byte-identical shards for "
        f"any --workers. Tasks: {tasks}."
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", required=True, choices=list(TASKS), help="what the primary target is (see above)"
    )
    p.add_argument("--n", required=True, type=positive_int, help="number of images")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="scenario: deeplense1/2/3 reproduce the physics of DeepLense's Model I/II/III (fixed "
        "lens, magnitude-20 source, images divided by their maximum: CDM subhalos are plainly "
        "visible, the vortex as ~8%% of the peak); model1, euclid, hst are the realistic ones (everything drawn, faint sources, "
        "1-5%% substructure mass: hard). Default model1",
    )
    which.add_argument(
        "--instrument",
        default=None,
        choices=list(INSTRUMENTS),
        help=f"the realistic preset of this instrument (same as --preset). {_instrument_help()}",
    )
    p.add_argument("--size", type=_size, default=None, help="pixels per side (default: the preset's)")
    p.add_argument(
        "--pixel-scale", type=positive_float, default=None, help="arcsec per pixel (default: the preset's)"
    )
    add_pack_options(p, skip_bad=False, seed_help="seed of the simulation and of the split")
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write a PNG grid of 8 training images per class (or spanning the target)",
    )
    add_physics_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.val + args.test >= 1.0:
        raise UsageError(f"--val ({args.val}) plus --test ({args.test}) must be below 1")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} already exists; choose another --out or pass --overwrite")
    try:
        packed = simulate(
            args.task, args.n, args.out, preset=args.preset or args.instrument or "model1",
            physics=physics_overrides(args), size=args.size, pixel_scale=args.pixel_scale, seed=args.seed,
            workers=args.workers, val=args.val, test=args.test, shard_size=args.shard_size, dtype=args.dtype,
            overwrite=args.overwrite, result=True,
        )
    except (SimulateError, OutputExistsError) as exc:
        raise UsageError(str(exc)) from None
    m = packed.manifest
    counts = ", ".join(f"{name} {split.count}" for name, split in m.splits.items())
    n_shards = sum(len(split.shards) for split in m.splits.values())
    inst = m.source["instrument"]
    print(
        f"wrote {args.out}: {counts} samples in {n_shards} shards; image {tuple(m.image.shape)} {m.image.dtype} "
        f'(preset {m.source["preset"]}: {inst["name"]}, {inst["pixel_scale"]}"/px); task {args.task}, primary target {m.primary_target} '
        f"({m.target.kind})"
    )
    if args.grid is not None:
        print(f"wrote {_write_grid(args.out, args.grid, m)}")
    return 0
