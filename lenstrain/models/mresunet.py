"""mResUNet: a U-Net whose blocks are residual with multi-rate dilated convolutions, plus a regression head.

Each block runs four parallel 3x3 convolutions with dilation rates 1, 2, 3 and 4 (each producing a quarter
of the block's channels), concatenates them, fuses them with a 3x3 convolution and adds a (projected)
shortcut; the multi-rate branches see arcs and rings on several scales at once, which suits Einstein
rings of different radii. The encoder halves the resolution ``depth`` times with max-pooling (``ceil_mode``,
so odd sizes never lose a row); the decoder upsamples bilinearly *to the exact size of the skip
connection* before concatenating, so any input size works (150, 64, or sizes not divisible by 2^depth).

Head: global average pooling of the bottleneck and of the last decoder map, concatenated, then
``Dropout(drop_rate)`` and a Linear layer. Both ends feed the head, so every parameter gets a gradient.

``norm``: ``"bn"`` BatchNorm, ``"gn"`` GroupNorm, ``"ln"`` LayerNorm over channels (the zoo's shared
``make_norm``). Initialisation: the zoo's ``init_weights`` (Kaiming normal, fan-out, ReLU, for
convolutions; zero biases); the last norm of each residual branch starts at zero so that every block
starts as its shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lenstrain.models.blocks import NORMS, init_weights, make_norm
from lenstrain.models.registry import register_model

# ----------------------------------------------------------------------------------------------- config


@dataclass
class MResUNetConfig:
    in_channels: int = 1
    num_outputs: int = 1
    image_size: int = 150  # not used: the network is size-agnostic
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)  # encoder levels; the last one is the bottleneck
    dilations: tuple[int, ...] = (1, 2, 3, 4)
    drop_rate: float = 0.0
    norm: str = "bn"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if any(w % len(self.dilations) for w in self.widths):
            raise ValueError(
                f"widths {self.widths} must be multiples of len(dilations)={len(self.dilations)}"
            )


# ----------------------------------------------------------------------------------------------- blocks


class DilatedResBlock(nn.Module):
    """Parallel dilated 3x3 convs (rates ``dilations``) -> concat -> norm-ReLU -> 3x3 conv -> norm, + shortcut."""

    def __init__(self, c_in: int, c_out: int, dilations: tuple[int, ...], norm: str):
        super().__init__()
        c_branch = c_out // len(dilations)
        self.branches = nn.ModuleList(
            nn.Conv2d(c_in, c_branch, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.norm1 = make_norm(norm, c_branch * len(dilations))
        self.fuse = nn.Conv2d(c_branch * len(dilations), c_out, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out)
        self.norm2.is_last_norm = True
        if c_in == c_out:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), make_norm(norm, c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches], dim=1)
        y = self.norm2(self.fuse(self.act(self.norm1(y))))
        return self.act(y + self.shortcut(x))


class UpMerge(nn.Module):
    """Upsample to the skip's exact size, reduce channels with a 1x1 conv, concat with the skip, block."""

    def __init__(self, c_low: int, c_skip: int, c_out: int, dilations: tuple[int, ...], norm: str):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(c_low, c_skip, 1, bias=False), make_norm(norm, c_skip), nn.ReLU(True)
        )
        self.block = DilatedResBlock(2 * c_skip, c_out, dilations, norm)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([self.reduce(up), skip], dim=1))


# ------------------------------------------------------------------------------------------------ model


class MResUNet(nn.Module):
    def __init__(self, cfg: MResUNetConfig):
        super().__init__()
        self.cfg = cfg
        w, d = cfg.widths, cfg.dilations
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w[0], 3, padding=1, bias=False),
            make_norm(cfg.norm, w[0]),
            nn.ReLU(True),
        )
        self.down = nn.ModuleList()
        c = w[0]
        for c_out in w:
            self.down.append(DilatedResBlock(c, c_out, d, cfg.norm))
            c = c_out
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.up = nn.ModuleList(
            UpMerge(w[i + 1], w[i], w[i], d, cfg.norm) for i in reversed(range(len(w) - 1))
        )
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(w[-1] + w[0], cfg.num_outputs))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        bottleneck = x
        for merge, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = merge(x, skip)
        pooled = torch.cat([bottleneck.mean(dim=(-2, -1)), x.mean(dim=(-2, -1))], dim=1)
        return self.head(pooled)


def _init(model: nn.Module) -> None:
    init_weights(model)
    for m in model.modules():
        if getattr(m, "is_last_norm", False):
            nn.init.zeros_(m.weight)


# --------------------------------------------------------------------------------------------- variants


@register_model
def mresunet(**kwargs) -> MResUNet:
    """mResUNet, widths 16-256 over five levels, dilation rates 1-4."""
    return MResUNet(MResUNetConfig(**kwargs))
