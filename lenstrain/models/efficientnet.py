"""EfficientNetV2 (Tan & Le 2021) regressors/classifiers built from torchvision, trained from scratch.

torchvision's architecture is used as is (``weights=None``), with three changes: the stem convolution
takes ``in_channels`` instead of 3; the classifier is ``Dropout(drop_rate) + Linear(num_outputs)``; and
``norm="gn"``/``"ln"`` swaps every BatchNorm for the zoo's GroupNorm / channel LayerNorm (``make_norm``).
The network is fully convolutional with global average pooling, so any input size of at least 32x32
works; ``image_size`` is accepted and not needed.

Initialisation is torchvision's (Kaiming normal, fan-out, for the SiLU convolutions; zero biases), except
the new head: truncated normal (std 0.02) with a zero bias, as in the rest of the zoo (torchvision's
uniform +-1/sqrt(fan_out) gives weights up to +-1 when there is a single output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.models import efficientnet_v2_m, efficientnet_v2_s

from lenstrain.models.blocks import NORMS, make_norm
from lenstrain.models.registry import register_model

# ----------------------------------------------------------------------------------------------- config


@dataclass
class EfficientNetConfig:
    arch: str = "s"  # "s" or "m"
    in_channels: int = 1
    num_outputs: int = 1
    image_size: int = 150  # not used: the network is size-agnostic
    drop_rate: float = 0.0
    drop_path_rate: float = 0.2  # stochastic depth, torchvision's default
    norm: str = "bn"

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {self.arch!r}")
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")


_ARCHS = {"s": efficientnet_v2_s, "m": efficientnet_v2_m}

# ----------------------------------------------------------------------------------------------- blocks


def _swap_batchnorm(module: nn.Module, norm: str) -> None:
    """Replace every BatchNorm2d under ``module`` by the ``norm`` layer over the same channels."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make_norm(norm, child.num_features))
        else:
            _swap_batchnorm(child, norm)


# ------------------------------------------------------------------------------------------------ model


class EfficientNetV2(nn.Module):
    """torchvision EfficientNetV2 with an ``in_channels`` stem and a ``num_outputs`` head."""

    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.cfg = cfg
        net = _ARCHS[cfg.arch](
            weights=None,
            num_classes=cfg.num_outputs,
            dropout=cfg.drop_rate,
            stochastic_depth_prob=cfg.drop_path_rate,
        )
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            cfg.in_channels,
            stem.out_channels,
            kernel_size=stem.kernel_size,
            stride=stem.stride,
            padding=stem.padding,
            bias=False,
        )
        nn.init.kaiming_normal_(net.features[0][0].weight, mode="fan_out")
        if cfg.norm != "bn":
            _swap_batchnorm(net, cfg.norm)
        head = net.classifier[-1]
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.features = net.features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = net.classifier  # Dropout(drop_rate), Linear(num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------- variants


@register_model
def efficientnetv2_s(**kwargs) -> EfficientNetV2:
    """EfficientNetV2-S (about 20M params)."""
    return EfficientNetV2(EfficientNetConfig(arch="s", **kwargs))


@register_model
def efficientnetv2_m(**kwargs) -> EfficientNetV2:
    """EfficientNetV2-M (about 53M params)."""
    return EfficientNetV2(EfficientNetConfig(arch="m", **kwargs))
