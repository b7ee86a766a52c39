"""Model registry: ``@register_model`` on a variant function, ``create_model(name, **kw)`` to build it.

Every model maps ``(B, C, H, W)`` images to ``(B, num_outputs)``. Variant functions accept the
common keyword arguments ``in_channels``, ``num_outputs`` and ``image_size`` plus family-specific ones:
the fields of the family's one ``*Config`` dataclass, defined in the variant's own module.
"""

from __future__ import annotations

import dataclasses
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


def _import_families() -> None:
    """Import every family module beside this one, which runs their ``@register_model`` decorators."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in NOT_FAMILIES and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    _import_families()
    return sorted(_REGISTRY)


def model_options(name: str) -> tuple[str, ...] | None:
    """The family-specific keywords ``name`` takes (the fields of its family's ``*Config`` dataclass), or
    None where its module does not define exactly one such dataclass."""
    module = sys.modules[_REGISTRY[name].__module__]
    configs = [obj for obj in vars(module).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
               and obj.__module__ == module.__name__ and obj.__name__.endswith("Config")]
    if len(configs) != 1:
        return None
    return tuple(f.name for f in dataclasses.fields(configs[0]) if f.name not in COMMON_KEYWORDS)


def create_model(name: str, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name or keyword raises, listing the valid ones."""
    _import_families()
    if name not in _REGISTRY:
        raise UnknownModelError(f"Unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    options = model_options(name)
    unknown = [key for key in kwargs if options is not None and key not in options]
    if unknown:
        raise ModelOptionError(f"{name} does not take keyword {unknown[0]!r}; valid: {', '.join(options)}")
    return _REGISTRY[name](in_channels=in_channels, num_outputs=num_outputs, image_size=image_size, **kwargs)
