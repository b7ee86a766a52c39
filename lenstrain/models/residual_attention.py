"""Residual Attention Network (Wang et al. 2017, "Residual Attention Network for Image Classification").

Layout of Attention-56: a 7x7 stride-2 stem and 3x3 max-pool; then three stages, each a residual unit
(stride 2 from the second stage on) followed by one attention module; then three residual units at
stride 2, global average pooling and a linear head. The residual units are pre-activation bottlenecks.

An attention module (p=1, t=2, r=1) has p pre-units; a trunk branch T of t units; a soft-mask branch
that max-pools down ``n`` times (3, 2, 1 in the three stages) with r units after each pooling, r more
at the bottom, and comes back up with bilinear upsampling to the exact size of the level above, adding
that level's features and a skip unit before r units; then norm-ReLU-1x1 conv twice and a sigmoid give
the mask M. The module outputs ``(1 + M) * T`` (attention residual learning) followed by p post-units.
Since the upsampling targets exact sizes, any input size works (150 and 64 included).

The paper's widths (256-2048 output channels) are scaled down for CPU work: ``widths`` are the output
channels of the four stages (a bottleneck's inner width is a quarter of them); the default (128, 256,
512, 1024) is half the paper's. ``norm``: ``"bn"`` BatchNorm, ``"gn"`` GroupNorm, ``"ln"`` LayerNorm over
channels (the zoo's shared ``make_norm``). ``drop_rate`` is dropout before the head. Initialisation: the
zoo's ``init_weights`` (Kaiming normal, fan-out, ReLU, for convolutions; zero biases).
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
class ResidualAttentionConfig:
    in_channels: int = 1
    num_outputs: int = 1
    image_size: int = 150  # not used: the network is size-agnostic
    stem_width: int = 32
    widths: tuple[int, int, int, int] = (128, 256, 512, 1024)
    modules_per_stage: tuple[int, int, int] = (1, 1, 1)  # Attention-56; (1, 2, 3) gives Attention-92
    mask_depths: tuple[int, int, int] = (3, 2, 1)  # down-samplings in each stage's soft-mask branch
    final_units: int = 3
    drop_rate: float = 0.0
    norm: str = "bn"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if len(self.widths) != 4 or len(self.modules_per_stage) != 3 or len(self.mask_depths) != 3:
            raise ValueError("widths needs 4 entries; modules_per_stage and mask_depths need 3")


# ----------------------------------------------------------------------------------------------- blocks


class PreActBottleneck(nn.Module):
    """norm-ReLU-1x1 -> norm-ReLU-3x3(stride) -> norm-ReLU-1x1, plus identity or 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, norm: str, stride: int = 1):
        super().__init__()
        mid = max(1, c_out // 4)
        self.norm1 = make_norm(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.norm2 = make_norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.norm3 = make_norm(norm, mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.norm1(x))
        shortcut = x if self.proj is None else self.proj(a)
        y = self.conv1(a)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return y + shortcut


class SoftMaskBranch(nn.Module):
    """Bottom-up (max-pool) / top-down (bilinear) branch ending in a sigmoid mask of the trunk's shape."""

    def __init__(self, c: int, depth: int, norm: str):
        super().__init__()
        self.depth = depth
        self.down = nn.ModuleList(PreActBottleneck(c, c, norm) for _ in range(depth))
        self.skips = nn.ModuleList(PreActBottleneck(c, c, norm) for _ in range(depth - 1))
        self.bottom = PreActBottleneck(c, c, norm)
        self.up = nn.ModuleList(PreActBottleneck(c, c, norm) for _ in range(depth - 1))
        self.to_mask = nn.Sequential(
            make_norm(norm, c), nn.ReLU(True), nn.Conv2d(c, c, 1, bias=False),
            make_norm(norm, c), nn.ReLU(True), nn.Conv2d(c, c, 1, bias=True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for unit in self.down:
            h = unit(F.max_pool2d(h, kernel_size=3, stride=2, padding=1))
            feats.append(h)
        h = self.bottom(h)
        for i in reversed(range(self.depth - 1)):
            f = feats[i]
            h = F.interpolate(h, size=f.shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[i](h + f + self.skips[i](f))
        h = F.interpolate(h, size=trunk.shape[-2:], mode="bilinear", align_corners=False) + trunk
        return torch.sigmoid(self.to_mask(h))


class AttentionModule(nn.Module):
    """p pre-units, trunk of t units, soft mask M, output (1 + M) * T, p post-units (p=1, t=2, r=1)."""

    def __init__(self, c: int, mask_depth: int, norm: str):
        super().__init__()
        self.pre = PreActBottleneck(c, c, norm)
        self.trunk = nn.Sequential(PreActBottleneck(c, c, norm), PreActBottleneck(c, c, norm))
        self.mask = SoftMaskBranch(c, mask_depth, norm)
        self.post = PreActBottleneck(c, c, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        t = self.trunk(x)
        m = self.mask(x, t)
        return self.post((1 + m) * t)


# ------------------------------------------------------------------------------------------------ model


class ResidualAttentionNet(nn.Module):
    def __init__(self, cfg: ResidualAttentionConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.norm
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.stem_width, 7, stride=2, padding=3, bias=False),
            make_norm(n, cfg.stem_width),
            nn.ReLU(True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        c = cfg.stem_width
        for i, (width, n_mod, depth) in enumerate(
            zip(cfg.widths[:3], cfg.modules_per_stage, cfg.mask_depths, strict=True)
        ):
            layers = [PreActBottleneck(c, width, n, stride=1 if i == 0 else 2)]
            layers += [AttentionModule(width, depth, n) for _ in range(n_mod)]
            stages.append(nn.Sequential(*layers))
            c = width
        self.stages = nn.Sequential(*stages)
        final = [PreActBottleneck(c, cfg.widths[3], n, stride=2)]
        final += [PreActBottleneck(cfg.widths[3], cfg.widths[3], n) for _ in range(cfg.final_units - 1)]
        self.final = nn.Sequential(*final, make_norm(n, cfg.widths[3]), nn.ReLU(True))
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(cfg.widths[3], cfg.num_outputs))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.stages(self.stem(x)))
        return self.head(x.mean(dim=(-2, -1)))


# --------------------------------------------------------------------------------------------- variants


@register_model
def residual_attention_56(**kwargs) -> ResidualAttentionNet:
    """Attention-56 (three attention modules), half the paper's width."""
    return ResidualAttentionNet(ResidualAttentionConfig(**kwargs))
