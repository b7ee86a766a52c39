"""SmoothResidualNet: a physics-informed substructure classifier that looks at what a smooth lens cannot explain.

Substructure shows as a small residual on top of a smooth lens (the main halo's SIE and shear lensing a Sersic
source). The model has two parts, trained jointly:

* an encoder-decoder (a two-level U-Net) that predicts the image's smooth version: the same main lens and
  source without substructure and without noise. With ``data.stream.auxiliary: smooth`` the stream renders that
  image for every training sample, and its MSE against this prediction is added to the loss
  (``train.auxiliary_weight``). Its last layer starts near zero, so the prediction starts as the image itself;
* a classifier from the zoo (ResNet-18 by default) that reads two channels per input channel: the image, and
  its residual against the predicted smooth image.

Validation and test batches carry no smooth image: there the model is scored on its outputs alone, like any
other. The prediction of the last forward stays readable as ``smooth_prediction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lenstrain.models.registry import create_model, register_model


@dataclass(frozen=True)
class SmoothResidualConfig:
    width: int = 16  # channels of the encoder-decoder at full resolution (x2 and x4 at the two coarser levels)
    classifier: str = "resnet18"  # the zoo model that reads the image and its residual


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class SmoothUNet(nn.Module):
    """Image -> its smooth version, as the image plus a correction (near zero at the start)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.enc1, self.enc2, self.mid = _block(channels, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        self.dec2, self.dec1 = _block(6 * width, 2 * width), _block(3 * width, width)
        self.correction = nn.Conv2d(width, channels, 1)
        nn.init.normal_(self.correction.weight, std=1e-3)  # small, not zero: every layer gets a gradient
        nn.init.zeros_(self.correction.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return x + self.correction(d1)


class SmoothResidualNet(nn.Module):
    def __init__(self, cfg: SmoothResidualConfig, in_channels: int, num_outputs: int, image_size: int):
        super().__init__()
        self.smoother = SmoothUNet(in_channels, cfg.width)
        self.classifier = create_model(cfg.classifier, in_channels=2 * in_channels, num_outputs=num_outputs,
                                       image_size=image_size)
        self.smooth_prediction: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = self.smoother(x)
        self.smooth_prediction = smooth
        return self.classifier(torch.cat([x, x - smooth], dim=1))


@register_model
def smooth_residual_net(*, in_channels: int = 1, num_outputs: int = 1, image_size: int = 150,
                        **kw) -> SmoothResidualNet:
    return SmoothResidualNet(SmoothResidualConfig(**kw), in_channels, num_outputs, image_size)


smooth_residual_net.auxiliary = ("smooth",)  # what it predicts besides its outputs (registry.auxiliary_outputs)
