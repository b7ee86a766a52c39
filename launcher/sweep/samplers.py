"""The samplers and pruners a sweep file may name, each a row: name -> how to build it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optuna


def _grid(space: dict[str, list], seed: int, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GridSampler(space, seed=seed, **options)


# name -> (constructor, what it is); the constructor takes the seed (and the grid's space for grid)
SAMPLERS: dict[str, tuple[Callable[..., optuna.samplers.BaseSampler], str]] = {
    "tpe": (
        lambda seed, **kw: optuna.samplers.TPESampler(seed=seed, **{"constant_liar": True, **kw}),
        "tree-structured Parzen estimator (Bayesian); constant_liar keeps parallel workers apart",
    ),
    "cmaes": (
        lambda seed, **kw: optuna.samplers.CmaEsSampler(seed=seed, **kw),
        "CMA-ES (evolution strategy)",
    ),
    "nsga2": (lambda seed, **kw: optuna.samplers.NSGAIISampler(seed=seed, **kw), "NSGA-II (evolutionary)"),
    "random": (lambda seed, **kw: optuna.samplers.RandomSampler(seed=seed, **kw), "uniform random"),
    "grid": (_grid, "every combination of the choice lists, each exactly once"),
    "qmc": (lambda seed, **kw: optuna.samplers.QMCSampler(seed=seed, **kw), "quasi-Monte Carlo (Sobol)"),
}
SAMPLER_CLASSES = {
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "qmc": optuna.samplers.QMCSampler,
}

PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "asha": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "median": optuna.pruners.MedianPruner,
    "none": optuna.pruners.NopPruner,
}

_NOT_OPTIONS = {"self", "seed", "search_space"}


def option_problems(cls: type, options: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Options the class's constructor does not take, as (dotted path, message)."""
    valid = [name for name in inspect.signature(cls).parameters if name not in _NOT_OPTIONS]
    return [
        (f"{where}.{key}", f"unknown option; valid keys: {', '.join(valid) or '(none)'}")
        for key in options
        if key not in valid
    ]


def make_sampler(name: str, seed: int, options: dict[str, Any], grid: dict[str, list] | None = None):
    build, _ = SAMPLERS[name]
    return build(grid or {}, seed, **options) if name == "grid" else build(seed, **options)


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    return PRUNERS[name](**options)
