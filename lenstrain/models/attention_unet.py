"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas") with a
pooled regression head.

Encoder: levels of two 3x3 conv-norm-ReLU layers, separated by 2x2 max-pooling (``ceil_mode``, so odd sizes
keep their border). Decoder: at each level the coarser map is the *gating signal* g for the skip x of that
level. An additive attention gate computes, at g's (coarser) resolution,
``alpha = sigmoid(psi(ReLU(W_x x + W_g g)))`` with W_x a 2x2 stride-2 convolution and W_g, psi 1x1
convolutions, resamples alpha bilinearly to x's size and passes on ``alpha * x`` (followed by a 1x1
conv-norm, as in the paper). The gated skip is concatenated with g, upsampled to the skip's exact size,
and two conv-norm-ReLU layers follow. Because every resampling targets an exact size, any input size works.

Head: global average pooling of the bottleneck and of the last decoder map, concatenated, then
``Dropout(drop_rate)`` and a Linear layer. ``forward_with_attention`` also returns the attention maps.

``norm``: ``"bn"`` BatchNorm, ``"gn"`` GroupNorm, ``"ln"`` LayerNorm over channels (the zoo's shared
``make_norm``). Initialisation: the zoo's ``init_weights`` (Kaiming normal, fan-out, ReLU, for
convolutions; zero biases).
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
class AttentionUNetConfig:
    in_channels: int = 1
    num_outputs: int = 1
    image_size: int = 150  # not used: the network is size-agnostic
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)  # encoder levels; the last one is the bottleneck
    drop_rate: float = 0.0
    norm: str = "bn"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")


# ----------------------------------------------------------------------------------------------- blocks


def conv_norm_act(c_in: int, c_out: int, norm: str, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), make_norm(norm, c_out), nn.ReLU(True)
    )


class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__(conv_norm_act(c_in, c_out, norm), conv_norm_act(c_out, c_out, norm))


class AttentionGate(nn.Module):
    """Additive attention gate: skip ``x`` (fine) is weighted by a map computed with gating signal ``g`` (coarse)."""

    def __init__(self, c_x: int, c_g: int, c_inter: int, norm: str):
        super().__init__()
        self.theta_x = nn.Conv2d(c_x, c_inter, kernel_size=2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(c_g, c_inter, kernel_size=1, bias=True)
        self.psi = nn.Conv2d(c_inter, 1, kernel_size=1, bias=True)
        self.out = nn.Sequential(nn.Conv2d(c_x, c_x, 1, bias=False), make_norm(norm, c_x))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Pad x to even size so that the stride-2 projection covers it, then match g's size exactly.
        ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
        tx = self.theta_x(F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x)
        if tx.shape[-2:] != g.shape[-2:]:
            tx = F.interpolate(tx, size=g.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(tx + self.phi_g(g))))
        alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(alpha * x), alpha


class UpBlock(nn.Module):
    def __init__(self, c_low: int, c_skip: int, norm: str):
        super().__init__()
        self.gate = AttentionGate(c_skip, c_low, max(1, c_skip // 2), norm)
        self.reduce = conv_norm_act(c_low, c_skip, norm, k=1)
        self.conv = DoubleConv(2 * c_skip, c_skip, norm)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gated, alpha = self.gate(skip, low)
        up = F.interpolate(self.reduce(low), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([gated, up], dim=1)), alpha


# ------------------------------------------------------------------------------------------------ model


class AttentionUNet(nn.Module):
    def __init__(self, cfg: AttentionUNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        self.down = nn.ModuleList()
        c = cfg.in_channels
        for c_out in w:
            self.down.append(DoubleConv(c, c_out, cfg.norm))
            c = c_out
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.up = nn.ModuleList(UpBlock(w[i + 1], w[i], cfg.norm) for i in reversed(range(len(w) - 1)))
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(w[-1] + w[0], cfg.num_outputs))
        init_weights(self)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs and the attention maps of every gate, finest last."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        bottleneck = x
        maps = []
        for up, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x, alpha = up(x, skip)
            maps.append(alpha)
        pooled = torch.cat([bottleneck.mean(dim=(-2, -1)), x.mean(dim=(-2, -1))], dim=1)
        return self.head(pooled), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]


# --------------------------------------------------------------------------------------------- variants


@register_model
def attention_unet(**kwargs) -> AttentionUNet:
    """Attention U-Net, widths 16-256 over five levels, pooled regression head."""
    return AttentionUNet(AttentionUNetConfig(**kwargs))
