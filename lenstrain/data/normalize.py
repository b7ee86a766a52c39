"""Pixel normalisation, ``data.normalize``: the ``NORMALIZERS`` table maps each name to a function of a
batch ``(B, C, H, W)`` (modified in place where it can be) and the train split's pixel mean and std.

The batch builder applies it, after augmentation, so training, validation, ``eval`` and ``predict``
all read images the same way from the run's config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGE_DIMS = (-3, -2, -1)


def global_stats(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The train split's pixel mean and std, from the manifest."""
    return x.sub_(mean).div_(std)


def per_image_max(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:  # noqa: ARG001
    """Each image divided by its own maximum (left as it is where that is not positive)."""
    peak = x.amax(dim=IMAGE_DIMS, keepdim=True)
    return x.div_(peak.masked_fill_(peak <= 0, 1.0))


def per_image_std(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:  # noqa: ARG001
    """Each image less its own mean, over its own (population) std (1 where the image is flat)."""
    spread = x.std(dim=IMAGE_DIMS, keepdim=True, correction=0)
    return x.sub_(x.mean(dim=IMAGE_DIMS, keepdim=True)).div_(spread.masked_fill_(spread == 0, 1.0))


def asinh(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:  # noqa: ARG001
    """asinh(image / the train split's pixel std): linear for faint pixels, logarithmic for bright ones."""
    return x.div_(std).asinh_()


def none(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:  # noqa: ARG001
    return x


NORMALIZERS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "global": global_stats,
    "per_image_max": per_image_max,
    "per_image_std": per_image_std,
    "asinh": asinh,
    "none": none,
}
