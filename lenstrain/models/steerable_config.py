"""The configuration of the steerable (escnn) models: in its own module so that
:mod:`lenstrain.models.equivariant` (which never imports escnn) and :mod:`lenstrain.models._steerable` (which
does) both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


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
