"""ResNet-18/34/50/101 regressors and classifiers, built on torchvision's ResNet (no pretrained weights).

The stem takes ``in_channels`` channels, the norm layer is selectable, and the head is
dropout + linear to ``num_outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from lenstrain.models.blocks import init_weights, norm_layer
from lenstrain.models.registry import register_model

# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "basic"  # "basic" | "bottleneck"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    norm: str = "bn"  # "bn" | "gn" | "ln"
    drop_rate: float = 0.0  # dropout before the head
    zero_init_residual: bool = False  # start every residual branch at zero (last norm scale = 0)


# --------------------------------------------------------------------------- blocks

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


# --------------------------------------------------------------------------- model


class ResNetRegressor(ResNet):
    """torchvision's ResNet with an ``in_channels`` stem and a dropout + linear head."""

    def __init__(self, cfg: ResNetConfig, in_channels: int = 1, num_outputs: int = 1):
        if cfg.block not in BLOCKS:
            raise ValueError(f"Unknown block {cfg.block!r}; choose one of {', '.join(BLOCKS)}")
        block = BLOCKS[cfg.block]
        super().__init__(block, list(cfg.layers), num_classes=num_outputs, norm_layer=norm_layer(cfg.norm))
        self.cfg = cfg
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.num_features = 512 * block.expansion
        self.fc = nn.Sequential(
            nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity(),
            nn.Linear(self.num_features, num_outputs),
        )
        # torchvision already initialised the body (Kaiming fan-out, unit norms); init the new layers.
        init_weights(self.conv1)
        init_weights(self.fc)
        if cfg.zero_init_residual:
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None:
                    nn.init.zeros_(last.weight)


def _create(cfg: ResNetConfig, *, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150, **kw):
    # Fully convolutional with global pooling: image_size is accepted but not needed.
    return ResNetRegressor(replace(cfg, **kw), in_channels=in_channels, num_outputs=num_outputs)


# --------------------------------------------------------------------------- variants


@register_model
def resnet18(**kw) -> ResNetRegressor:
    return _create(ResNetConfig(block="basic", layers=(2, 2, 2, 2)), **kw)


@register_model
def resnet34(**kw) -> ResNetRegressor:
    return _create(ResNetConfig(block="basic", layers=(3, 4, 6, 3)), **kw)


@register_model
def resnet50(**kw) -> ResNetRegressor:
    return _create(ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3)), **kw)


@register_model
def resnet101(**kw) -> ResNetRegressor:
    return _create(ResNetConfig(block="bottleneck", layers=(3, 4, 23, 3)), **kw)
