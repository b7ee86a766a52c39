"""Model registry: ``@register_model`` on a variant function, ``create_model(name, **kw)`` to build it.

Every model maps ``(B, C, H, W)`` images to ``(B, num_outputs)``. Variant functions accept the
common keyword arguments ``in_channels``, ``num_outputs`` and ``image_size`` plus family-specific ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """Raised for a model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function under its own name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def _import_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    from lenstrain.models import families  # noqa: F401


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kwargs) -> nn.Module:
    """Build a registered model by name."""
    _import_families()
    if name not in _REGISTRY:
        raise UnknownModelError(f"Unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](in_channels=in_channels, num_outputs=num_outputs, image_size=image_size, **kwargs)
