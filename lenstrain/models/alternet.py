"""AlterNet (Park & Kim 2022, "How Do Vision Transformers Work?").

A pre-activation ResNet whose stages end with blocks that alternate between convolution and
windowed multi-head self-attention (MSA): a stage of ``d`` blocks with ``m`` MSA blocks is
``d - 2m`` conv blocks followed by ``m`` (conv, MSA) pairs. The MSA block lives in ``blocks.py``;
it pads feature maps to a multiple of the window, so 150x150 and 64x64 inputs both work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from lenstrain.models.blocks import (
    DropPath,
    alternating_stages,
    classifier_head,
    init_weights,
    make_norm,
)
from lenstrain.models.registry import register_model

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AlterNetConfig:
    block: str = "bottleneck"  # "basic" (expansion 1) or "bottleneck" (expansion 4)
    depths: tuple[int, ...] = (3, 4, 6, 4)  # blocks per stage, MSA blocks included
    msa: tuple[int, ...] = (0, 1, 3, 2)  # MSA blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck (inner) width per stage
    heads: tuple[int, ...] = (3, 6, 12, 24)
    dim_head: int = 64
    window: int = 7
    stem_width: int = 64
    norm: str = "bn"  # "bn" | "gn" | "ln"
    drop_rate: float = 0.0  # dropout before the head
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate over the blocks
    attn_drop: float = 0.0


# --------------------------------------------------------------------------- blocks


class PreActBasicBlock(nn.Module):
    """norm-ReLU-conv3x3-norm-ReLU-conv3x3, plus shortcut (1x1 conv of the pre-activation when
    the shape changes)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, norm: str = "bn", drop_path: float = 0.0):
        super().__init__()
        out_ch = width * self.expansion
        self.norm1 = make_norm(norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.norm2 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.act(self.norm2(out)))
        return skip + self.drop_path(out)


class PreActBottleneck(nn.Module):
    """norm-ReLU-conv1x1-norm-ReLU-conv3x3(stride)-norm-ReLU-conv1x1, plus shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, norm: str = "bn", drop_path: float = 0.0):
        super().__init__()
        out_ch = width * self.expansion
        self.norm1 = make_norm(norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.norm2 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.norm3 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.act(self.norm2(out)))
        out = self.conv3(self.act(self.norm3(out)))
        return skip + self.drop_path(out)


BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


# --------------------------------------------------------------------------- model


class AlterNet(nn.Module):
    def __init__(self, cfg: AlterNetConfig, in_channels: int = 1, num_outputs: int = 1):
        super().__init__()
        if cfg.block not in BLOCKS:
            raise ValueError(f"Unknown block {cfg.block!r}; choose one of {', '.join(BLOCKS)}")
        n = len(cfg.depths)
        if not (len(cfg.msa) == len(cfg.widths) == len(cfg.heads) == n):
            raise ValueError("depths, msa, widths and heads need one entry per stage")
        self.cfg = cfg
        block = BLOCKS[cfg.block]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, cfg.stem_width, 7, 2, 3, bias=False),
            make_norm(cfg.norm, cfg.stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        self.stages, ch = alternating_stages(cfg, cfg.stem_width, block, block.expansion)
        self.final_norm = make_norm(cfg.norm, ch)
        self.final_act = nn.ReLU(inplace=True)
        self.num_features = ch
        self.head = classifier_head(ch, num_outputs, cfg.drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.final_act(self.final_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _create(cfg: AlterNetConfig, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kw):
    # Fully convolutional with global pooling: image_size is accepted but not needed.
    return AlterNet(replace(cfg, **kw), in_channels=in_channels, num_outputs=num_outputs)


# --------------------------------------------------------------------------- variants


@register_model
def alternet_tiny(**kw) -> AlterNet:
    """~0.06M params: a smoke-test model (one block per stage, one MSA block)."""
    return _create(AlterNetConfig(block="basic", depths=(1, 1, 1, 2), msa=(0, 0, 0, 1), widths=(16, 24, 32, 32), heads=(1, 1, 1, 2), dim_head=16, stem_width=16), **kw)


@register_model
def alternet_18(**kw) -> AlterNet:
    """Basic-block AlterNet: ResNet-18 depth with one MSA block closing each of the last three stages."""
    return _create(AlterNetConfig(block="basic", depths=(2, 2, 2, 2), msa=(0, 1, 1, 1), heads=(3, 6, 12, 24), dim_head=32), **kw)


@register_model
def alternet_50(**kw) -> AlterNet:
    """The reference AlterNet-50: stages (3,4,6,4), MSA (0,1,3,2), heads (3,6,12,24), window 7 (36M at 224px, 1000 classes)."""
    return _create(AlterNetConfig(), **kw)


@register_model
def alternet_large(**kw) -> AlterNet:
    """~300M params (50 GFLOPs at 150x150): 2.5x as wide as AlterNet-50, ResNet-101 deep, six MSA blocks in stage 3."""
    return _create(AlterNetConfig(depths=(3, 4, 23, 4), msa=(0, 1, 6, 2), widths=(160, 320, 640, 1280), heads=(5, 10, 20, 40), stem_width=128), **kw)
