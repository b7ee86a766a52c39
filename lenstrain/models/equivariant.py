"""E(2)-equivariant steerable CNNs (escnn) with a rotation-invariant regression/classification head.

A lensing image has no preferred orientation: rotating or flipping it keeps every label. These models
build that symmetry in. Every hidden layer is a steerable convolution (``R2Conv``) whose feature fields
transform under the regular representation of the cyclic group C_N (``escnn_c8``) or the dihedral group
D_N (``escnn_d8``, rotations and reflections). Group pooling then takes the maximum over each field's
orientations, which leaves invariant feature maps; global spatial averaging and a small MLP give the output.

Input handling. Following the escnn tutorial, the network works on an odd-sized canvas (129x129 by
default) so that every stride-2 pooling keeps the rotation centre on a pixel. The tutorial crops/resizes
to an even size and pads one pixel on one side; that shifts the rotation centre of the content by half a
pixel, which breaks exact equivariance to 90 degree rotations of the original image. So the model instead
resizes the input directly to the odd canvas (bilinear, antialiased when shrinking): 150x150 is shrunk to
129x129 and 64x64 is upsampled to 129x129. Bilinear resizing of a square image commutes exactly with the
symmetries of the square, so the end-to-end model is invariant to 90 degree rotations (and, for D8, to
flips) up to floating-point rounding. A soft disk mask then removes the corners, which a rotation by an
angle other than a multiple of 90 degrees would move off the grid. Non-square inputs are resized to the
square canvas as well (their aspect ratio is not kept). ``image_size`` is accepted for a uniform interface
and is not needed.

Normalisation. ``norm="bn"`` uses escnn's ``InnerBatchNorm`` (statistics shared across the channels of a
field). ``"gn"`` and ``"ln"`` use a group norm whose groups hold whole fields and whose affine parameters
are shared within a field, which keeps the layer equivariant; ``"ln"`` is the one-group case (statistics
over all channels and pixels of a sample, unlike the per-pixel channel LayerNorm of the plain CNNs).
D8 fields are twice as wide as C8 ones, so ``escnn_d8`` uses about 1/sqrt(2) as many fields per layer,
which keeps its parameter count close to ``escnn_c8`` (its FLOPs are about twice as high).

Initialisation. Steerable kernels are spanned by a fixed equivariant basis; escnn's generalised He
initialisation of the basis coefficients (its default) is the equivariant counterpart of Kaiming init.
The MLP head uses Kaiming init with zero biases.

escnn is imported only when a steerable model is built (:mod:`lenstrain.models._steerable` holds the layers), so
that listing the zoo, or training any other model, never imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from lenstrain.models.registry import register_model

# ----------------------------------------------------------------------------------------------- config


@dataclass
class SteerableConfig:
    in_channels: int = 1
    num_outputs: int = 1
    image_size: int = 150  # not used: every input is resized to ``canvas``
    n_rotations: int = 8
    flips: bool = False
    fields: tuple[int, ...] = (8, 16, 24, 32, 48)  # regular fields per layer; a pool follows all but the last
    kernel_sizes: tuple[int, ...] = (7, 5, 3, 3, 3)
    canvas: int = 129  # odd, so that stride-2 pooling keeps the rotation centre on a pixel
    mask: bool = True
    pool_sigma: float = 0.66
    hidden: int = 64
    drop_rate: float = 0.0
    norm: str = "bn"

    def __post_init__(self) -> None:
        if self.canvas % 2 == 0:
            raise ValueError(f"canvas must be odd to keep the rotation centre, got {self.canvas}")
        if len(self.fields) != len(self.kernel_sizes):
            raise ValueError("fields and kernel_sizes must have the same length")
        if self.norm not in ("bn", "gn", "ln"):
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of bn, gn, ln")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError("kernel sizes must be odd")


# --------------------------------------------------------------------------------------------- variants


def _create(n_rotations: int, flips: bool, fields: tuple[int, ...], **kwargs) -> nn.Module:
    from lenstrain.models._steerable import SteerableCNN  # escnn: imported only for these models

    kwargs.setdefault("fields", fields)
    return SteerableCNN(SteerableConfig(n_rotations=n_rotations, flips=flips, **kwargs))


# D8 regular fields are twice as wide as C8 ones; dividing the field counts by about sqrt(2) keeps
# the parameter count close to the C8 model.
_C8_FIELDS = (8, 16, 24, 32, 48)
_D8_FIELDS = tuple(max(1, round(n / math.sqrt(2))) for n in _C8_FIELDS)


@register_model
def escnn_c8(**kwargs) -> nn.Module:
    """C8 (8 rotations) steerable CNN, invariant head."""
    return _create(8, False, _C8_FIELDS, **kwargs)


@register_model
def escnn_d8(**kwargs) -> nn.Module:
    """D8 (8 rotations and reflections) steerable CNN, invariant head."""
    return _create(8, True, _D8_FIELDS, **kwargs)


def __getattr__(name: str):
    """The implementation's names (``SteerableCNN``, ``disk_mask``, ...), importing escnn on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    from lenstrain.models import _steerable

    try:
        return getattr(_steerable, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
