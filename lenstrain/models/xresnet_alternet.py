"""XResNet + AlterNet hybrid.

An XResNet in the fastai style (the "bag of tricks" ResNet): a three-conv stem
(c_in -> 32 -> 32 -> 64), ResNet-D downsampling (average-pool, then a 1x1 conv in the shortcut),
post-activation residual blocks whose last norm starts at zero scale. The last blocks of each
stage alternate with windowed MSA blocks, laid out as in AlterNet (see ``alternet.py``).
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
class XResNetAlterNetConfig:
    expansion: int = 4  # 1: basic blocks (two 3x3 convs), 4: bottlenecks
    depths: tuple[int, ...] = (3, 4, 6, 4)  # blocks per stage, MSA blocks included
    msa: tuple[int, ...] = (0, 1, 3, 2)  # MSA blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # inner width per stage
    heads: tuple[int, ...] = (3, 6, 12, 24)
    dim_head: int = 64
    window: int = 7
    stem: tuple[int, ...] = (32, 32, 64)
    norm: str = "bn"  # "bn" | "gn" | "ln"
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_drop: float = 0.0


# --------------------------------------------------------------------------- blocks


def conv_norm_act(in_ch: int, out_ch: int, k: int = 3, stride: int = 1, norm: str = "bn", act: bool = True):
    layers = [nn.Conv2d(in_ch, out_ch, k, stride, k // 2, bias=False), make_norm(norm, out_ch)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class XResBlock(nn.Module):
    """Post-activation residual block, ``ReLU(convs(x) + shortcut(x))``.

    The stride sits in the 3x3 conv; the shortcut downsamples with a 2x2 average pool and then
    matches channels with a 1x1 conv + norm (ResNet-D). The last norm of ``convs`` is zero-initialised
    (see :meth:`zero_init_last`), so each block starts as the identity.
    """

    def __init__(
        self, expansion: int, in_ch: int, width: int, stride: int = 1, norm: str = "bn", drop_path: float = 0.0
    ):
        super().__init__()
        out_ch = width * expansion
        if expansion == 1:
            self.convs = nn.Sequential(
                conv_norm_act(in_ch, width, 3, stride, norm),
                conv_norm_act(width, out_ch, 3, 1, norm, act=False),
            )
        else:
            self.convs = nn.Sequential(
                conv_norm_act(in_ch, width, 1, 1, norm),
                conv_norm_act(width, width, 3, stride, norm),
                conv_norm_act(width, out_ch, 1, 1, norm, act=False),
            )
        shortcut = []
        if stride != 1:
            shortcut.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        if in_ch != out_ch:
            shortcut.append(conv_norm_act(in_ch, out_ch, 1, 1, norm, act=False))
        self.shortcut = nn.Sequential(*shortcut)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.convs[-1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop_path(self.convs(x)) + self.shortcut(x))


# --------------------------------------------------------------------------- model


class XResNetAlterNet(nn.Module):
    def __init__(self, cfg: XResNetAlterNetConfig, in_channels: int = 1, num_outputs: int = 1):
        super().__init__()
        n = len(cfg.depths)
        if not (len(cfg.msa) == len(cfg.widths) == len(cfg.heads) == n):
            raise ValueError("depths, msa, widths and heads need one entry per stage")
        if cfg.expansion not in (1, 4):
            raise ValueError(f"expansion must be 1 or 4, not {cfg.expansion}")
        self.cfg = cfg
        stem, ch = [], in_channels
        for i, out in enumerate(cfg.stem):
            stem.append(conv_norm_act(ch, out, 3, 2 if i == 0 else 1, cfg.norm))
            ch = out
        stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        self.stages, ch = alternating_stages(
            cfg, ch, lambda *args: XResBlock(cfg.expansion, *args), cfg.expansion)
        self.num_features = ch
        self.head = classifier_head(ch, num_outputs, cfg.drop_rate)
        init_weights(self)
        for m in self.modules():
            if isinstance(m, XResBlock):
                m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _create(
    cfg: XResNetAlterNetConfig, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kw
):
    # Fully convolutional with global pooling: image_size is accepted but not needed.
    return XResNetAlterNet(replace(cfg, **kw), in_channels=in_channels, num_outputs=num_outputs)


# --------------------------------------------------------------------------- variants


@register_model
def xresnet_alternet_18(**kw) -> XResNetAlterNet:
    return _create(XResNetAlterNetConfig(expansion=1, depths=(2, 2, 2, 2), msa=(0, 1, 1, 1), dim_head=32), **kw)


@register_model
def xresnet_alternet_50(**kw) -> XResNetAlterNet:
    return _create(XResNetAlterNetConfig(), **kw)
