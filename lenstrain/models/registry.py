"""Model registry: ``@register_model`` on a variant function, ``create_model(name, **kw)`` to build it.

Every model maps ``(B, C, H, W)`` images to ``(B, num_outputs)``. Variant functions accept the
common keyword arguments ``in_channels``, ``num_outputs`` and ``image_size`` plus family-specific ones:
the fields of the family's one ``*Config`` dataclass, defined in the variant's own module.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

COMMON_KEYWORDS = ("in_channels", "num_outputs", "image_size")
NOT_FAMILIES = {"registry", "blocks"}  # the modules of this package that define no models

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


class ModelOptionError(TypeError):
    """A keyword argument that the model does not take; the message lists those it does."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function under its own name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def _families() -> list[str]:
    """The family modules beside this one."""
    package = __name__.rpartition(".")[0]
    return [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(Path(__file__).parent)])
            if info.name not in NOT_FAMILIES and not info.name.startswith("_")]


def _import_families() -> None:
    """Import every family module, which runs their ``@register_model`` decorators."""
    for family in _families():
        importlib.import_module(family)


@functools.cache
def family_index() -> dict[str, str]:
    """{model name: its family module}, read from the families' source: the functions they decorate with
    ``@register_model``. Naming or building one model then imports its own family only: checking a config's
    ``model.name`` no longer imports escnn and every other family (about a second of CPU per process)."""
    index = {}
    for family in _families():
        path = Path(__file__).parent / f"{family.rpartition('.')[2]}.py"
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "register_model" for d in node.decorator_list):
                index[node.name] = family
    return index


def _import_family_of(name: str) -> None:
    if name not in _REGISTRY:
        if name in family_index():
            importlib.import_module(family_index()[name])
        else:  # registered some other way than the index can see
            _import_families()


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(set(family_index()) | set(_REGISTRY))


def auxiliary_outputs(name: str) -> tuple[str, ...]:
    """What ``name`` predicts besides its outputs, for an auxiliary target to train (``data.stream.auxiliary``):
    a variant function declares it as its ``auxiliary`` attribute, and the model keeps the prediction of the
    last forward as ``<output>_prediction`` (e.g. ``smooth_prediction``)."""
    _import_family_of(name)
    return tuple(getattr(_REGISTRY[name], "auxiliary", ()))


def models_with_auxiliary(output: str) -> list[str]:
    """The registered models that predict ``output`` besides their outputs (imports every family)."""
    _import_families()
    return sorted(name for name, fn in _REGISTRY.items() if output in getattr(fn, "auxiliary", ()))


def model_options(name: str) -> tuple[str, ...] | None:
    """The family-specific keywords ``name`` takes (the fields of its family's ``*Config`` dataclass), or
    None where its module does not define exactly one such dataclass."""
    _import_family_of(name)
    module = sys.modules[_REGISTRY[name].__module__]
    configs = [obj for obj in vars(module).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
               and obj.__module__ == module.__name__ and obj.__name__.endswith("Config")]
    if len(configs) != 1:
        return None
    return tuple(f.name for f in dataclasses.fields(configs[0]) if f.name not in COMMON_KEYWORDS)


def create_model(name: str, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name or keyword raises, listing the valid ones."""
    _import_family_of(name)
    if name not in _REGISTRY:
        raise UnknownModelError(f"Unknown model {name!r}; known: {', '.join(list_models())}")
    options = model_options(name)
    unknown = [key for key in kwargs if options is not None and key not in options]
    if unknown:
        raise ModelOptionError(f"{name} does not take keyword {unknown[0]!r}; valid: {', '.join(options)}")
    return _REGISTRY[name](in_channels=in_channels, num_outputs=num_outputs, image_size=image_size, **kwargs)
