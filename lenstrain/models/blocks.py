"""Pieces shared by several model families: norm-layer factory, stochastic depth, weight init,
and the windowed multi-head self-attention (MSA) block used by the AlterNet families.

The windowed attention pads a feature map to a multiple of the window, masks the padded keys,
and crops back, so any spatial size works (150x150 and 64x64 lensing images included).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("bn", "gn", "ln")


# --------------------------------------------------------------------------- norms


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` map, at every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest number of groups <= ``max_groups`` that divides ``channels``."""
    return math.gcd(channels, max_groups)


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-d norm layer: ``"bn"`` BatchNorm, ``"gn"`` GroupNorm (up to 32 groups), ``"ln"`` LayerNorm."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(gn_groups(channels), channels)
    if kind == "ln":
        return LayerNorm2d(channels)
    raise ValueError(f"Unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """A factory ``channels -> norm module`` (the ``norm_layer`` argument torchvision expects)."""
    if kind not in NORMS:
        raise ValueError(f"Unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
    return partial(make_norm, kind)


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm)


# --------------------------------------------------------------------------- init and regularisation


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) convolutions, truncated-normal linear layers, zero biases,
    unit norm scales. Modules may refine this afterwards (e.g. zero-init of residual branches)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm(m) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def drop_path_rates(rate: float, depths: tuple[int, ...] | list[int]) -> list[list[float]]:
    """Stochastic-depth rate for every block, rising linearly from 0 to ``rate``, grouped by stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start : start + d])
        start += d
    return out


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def classifier_head(in_features: int, num_outputs: int, drop_rate: float = 0.0) -> nn.Sequential:
    """Global average pool, dropout, linear."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity(),
        nn.Linear(in_features, num_outputs),
    )


# --------------------------------------------------------------------------- windows


def pad_to_multiple(x: torch.Tensor, window: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad a channels-last ``(B, H, W, C)`` map at the bottom and right to multiples of ``window``."""
    h, w = x.shape[1:3]
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x, ph, pw


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``window`` -> ``(B * nW, window * window, C)``.
    Windows are ordered batch-major, then by row, then by column."""
    b, h, w, c = x.shape
    nh, nw = h // window, w // window
    x = x.view(b, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window * window, c)


def window_merge(t: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window * window, C)`` -> ``(B, H, W, C)``."""
    nh, nw = h // window, w // window
    t = t.view(b, nh, nw, window, window, t.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, h, w, -1)


def relative_position_index(window: int) -> torch.Tensor:
    """``(N, N)`` index into a ``(2w-1)^2`` table of relative offsets, ``N = window^2``."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), each in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows of a feature map,
    with a learned relative position bias per head.

    Maps ``(B, dim, H, W)`` to ``(B, dim_out, H, W)`` for any H, W. The projections run on the real
    pixels only; queries, keys and values are then zero-padded to multiples of the window, padded
    keys are masked out of every softmax, and the output is cropped back before the output
    projection. Padding therefore never changes the result at real positions.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        heads: int = 8,
        dim_head: int = 64,
        window: int = 7,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        inner = heads * dim_head
        self.heads, self.dim_head, self.window = heads, dim_head, window
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim_out)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        if rel_pos_bias:
            self.rel_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
            nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
            self.register_buffer("rel_index", relative_position_index(window), persistent=False)
        else:
            self.rel_bias_table = None

    def _bias(self, b: int, h: int, w: int, ph: int, pw: int, like: torch.Tensor) -> torch.Tensor | None:
        """Additive attention bias: relative positions, plus -inf on padded keys.
        Broadcastable to ``(B * nW, heads, N, N)``."""
        n = self.window**2
        bias = None
        if self.rel_bias_table is not None:
            rel = self.rel_bias_table[self.rel_index.reshape(-1)].view(n, n, self.heads)
            bias = rel.permute(2, 0, 1).unsqueeze(0).to(like.dtype)  # (1, heads, N, N)
        if ph or pw:
            valid = F.pad(like.new_ones(1, h, w, 1), (0, 0, 0, pw, 0, ph))
            valid = window_partition(valid, self.window)[..., 0]  # (nW, N)
            mask = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))[:, None, None, :]
            bias = mask if bias is None else bias + mask  # (nW, heads, N, N): padded keys masked
            bias = bias.repeat(b, 1, 1, 1)  # window index is b * nW + i
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x.permute(0, 2, 3, 1))  # (B, H, W, 3 * inner), real pixels only
        qkv, ph, pw = pad_to_multiple(qkv, self.window)
        hp, wp = h + ph, w + pw
        qkv = window_partition(qkv, self.window)  # (B*nW, N, 3 * inner)
        bw, n, _ = qkv.shape
        q, k, v = qkv.view(bw, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q,  # (B*nW, heads, N, d)
            k,
            v,
            attn_mask=self._bias(b, h, w, ph, pw, q),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(bw, n, self.heads * self.dim_head)
        out = window_merge(out, self.window, b, hp, wp)[:, :h, :w]  # (B, H, W, inner)
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2)


class MSABlock(nn.Module):
    """Pre-activation residual block with windowed self-attention in place of the 3x3 convolution:

        x + DropPath(WindowAttention(norm(Conv1x1(ReLU(norm(x))))))

    The 1x1 convolution narrows ``dim`` to ``dim // expansion`` (like a bottleneck), and the
    attention's output projection widens back to ``dim``. The block keeps shape and resolution.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int = 64,
        window: int = 7,
        expansion: int = 4,
        norm: str = "bn",
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        width = dim // expansion
        self.norm1 = make_norm(norm, dim)
        self.act = nn.ReLU(inplace=False)
        self.reduce = nn.Conv2d(dim, width, 1, bias=False)
        self.norm2 = make_norm(norm, width)
        self.attn = WindowAttention(
            width,
            dim,
            heads=heads,
            dim_head=dim_head,
            window=window,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            rel_pos_bias=rel_pos_bias,
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.reduce(self.act(self.norm1(x))))
        return x + self.drop_path(self.attn(out))


def stage_layout(depth: int, msa: int) -> list[bool]:
    """Which blocks of a stage are MSA blocks: the last ``2 * msa`` blocks alternate conv, MSA,
    the rest are conv blocks (AlterNet's layout). ``True`` marks an MSA block."""
    if msa < 0 or 2 * msa > depth:
        raise ValueError(f"a stage of {depth} blocks holds at most {depth // 2} MSA blocks, not {msa}")
    return [False] * (depth - 2 * msa) + [False, True] * msa


def alternating_stages(cfg, in_channels: int, conv_block: Callable[..., nn.Module],
                       expansion: int) -> tuple[nn.Sequential, int]:
    """AlterNet's stages: conv blocks whose last ones alternate with MSA blocks (see ``stage_layout``).

    ``cfg`` provides depths, msa, widths, heads, dim_head, window, norm, drop_path and attn_drop;
    ``conv_block(in_ch, width, stride, norm, drop_path)`` builds one conv block whose output has
    ``width * expansion`` channels. Returns the stages and their output width.
    """
    dpr = drop_path_rates(cfg.drop_path, cfg.depths)
    stages, ch = [], in_channels
    for i, (depth, msa, width, heads) in enumerate(zip(cfg.depths, cfg.msa, cfg.widths, cfg.heads, strict=True)):
        layers = []
        for j, is_msa in enumerate(stage_layout(depth, msa)):
            if is_msa:
                layers.append(MSABlock(ch, heads=heads, dim_head=cfg.dim_head, window=cfg.window, expansion=expansion,
                                       norm=cfg.norm, drop_path=dpr[i][j], attn_drop=cfg.attn_drop))
            else:
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(conv_block(ch, width, stride, cfg.norm, dpr[i][j]))
                ch = width * expansion
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), ch
