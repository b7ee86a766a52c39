"""The escnn implementation of :mod:`lenstrain.models.equivariant` (see its docstring), imported only when a
steerable model is built, so that a run of any other model never imports escnn."""

from __future__ import annotations

import escnn.group._numerical as _escnn_numerical
import escnn.nn as enn
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from escnn import gspaces


def _patch_escnn_svd() -> None:
    """escnn solves for kernel bases with sklearn's ``randomized_svd`` on an ``np.matrix``, which recent
    scikit-learn releases reject (TypeError). Hand it a plain array instead; results are unchanged."""
    svd = getattr(_escnn_numerical, "randomized_svd", None)
    if svd is None or getattr(svd, "_lenstrain_asarray", False):
        return

    def randomized_svd(a, *args, **kwargs):
        return svd(np.asarray(a), *args, **kwargs)

    randomized_svd._lenstrain_asarray = True
    _escnn_numerical.randomized_svd = randomized_svd


_patch_escnn_svd()

# ----------------------------------------------------------------------------------------------- blocks


class StableR2Conv(enn.R2Conv):
    """``R2Conv`` whose ``state_dict`` keys do not depend on train/eval mode.

    escnn caches the expanded filter as a buffer in eval mode and deletes it in train mode, so a checkpoint
    written in one mode would not load strictly into a model in the other. Here the cache is a
    non-persistent buffer (never saved), and it is rebuilt after ``load_state_dict`` in eval mode.
    The cache is also expanded without autograd: escnn's keeps the expansion graph, which makes an eval
    model impossible to deepcopy (EMA/SWA copies) and breaks a second backward. In eval mode gradients
    still reach the input (saliency maps), not the convolution weights; train in train mode.
    """

    _CACHES = ("filter", "expanded_bias")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unpersist_caches()
        self.register_load_state_dict_post_hook(_refresh_filter_cache)

    def _unpersist_caches(self) -> None:
        for name in self._CACHES:
            if name in self._buffers:
                self._non_persistent_buffers_set.add(name)

    def train(self, mode: bool = True) -> StableR2Conv:
        with torch.no_grad():
            super().train(mode)
        self._unpersist_caches()
        return self


def _refresh_filter_cache(module: StableR2Conv, incompatible_keys) -> None:
    if not module.training:  # re-expand the cached filter from the weights just loaded
        module.train(True)
        module.train(False)


class FieldGroupNorm(enn.EquivariantModule):
    """Group norm over whole regular fields, with one scale and one shift per field (equivariant)."""

    def __init__(self, in_type: enn.FieldType, num_groups: int, eps: float = 1e-5):
        super().__init__()
        sizes = {r.size for r in in_type.representations}
        if len(sizes) != 1:
            raise ValueError("FieldGroupNorm needs fields of one size")
        self.in_type = self.out_type = in_type
        self.n_fields = len(in_type)
        self.field_size = sizes.pop()
        if self.n_fields % num_groups:
            raise ValueError(f"{num_groups} groups do not divide {self.n_fields} fields")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.n_fields))
        self.bias = nn.Parameter(torch.zeros(self.n_fields))

    def forward(self, x: enn.GeometricTensor) -> enn.GeometricTensor:
        t = F.group_norm(x.tensor, self.num_groups, eps=self.eps)
        b, c, h, w = t.shape
        t = t.view(b, self.n_fields, self.field_size, h, w)
        t = t * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return enn.GeometricTensor(t.view(b, c, h, w), self.out_type)

    def evaluate_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape


def _field_norm(kind: str, field_type: enn.FieldType) -> enn.EquivariantModule:
    if kind == "bn":
        return enn.InnerBatchNorm(field_type)
    n = len(field_type)
    if kind == "ln":
        return FieldGroupNorm(field_type, 1)
    groups = min(8, n)  # groups of whole fields; each field already holds |G| channels
    while n % groups:
        groups -= 1
    return FieldGroupNorm(field_type, groups)


def disk_mask(size: int, margin: float = 0.0, sigma: float = 2.0) -> torch.Tensor:
    """A (1,1,S,S) mask: 1 inside the inscribed disk, decaying as exp(-(r^2-t)/sigma^2) outside it."""
    c = (size - 1) / 2
    t = (c * (1 - margin / 100.0)) ** 2
    idx = torch.arange(size, dtype=torch.float64)
    r2 = (idx[:, None] - c) ** 2 + (idx[None, :] - c) ** 2
    mask = torch.where(r2 > t, torch.exp((t - r2) / sigma**2), torch.ones_like(r2))
    return mask.to(torch.float32)[None, None]


# ------------------------------------------------------------------------------------------------ model


class SteerableCNN(nn.Module):
    """Steerable CNN: [R2Conv-Norm-ReLU-AntialiasedPool] x L, GroupPooling, global mean, MLP."""

    def __init__(self, cfg):  # a lenstrain.models.equivariant.SteerableConfig
        super().__init__()
        self.cfg = cfg
        if cfg.flips:
            self.gspace = gspaces.flipRot2dOnR2(N=cfg.n_rotations)
        else:
            self.gspace = gspaces.rot2dOnR2(N=cfg.n_rotations)
        self.in_type = enn.FieldType(self.gspace, cfg.in_channels * [self.gspace.trivial_repr])
        if cfg.mask:
            self.register_buffer("mask", disk_mask(cfg.canvas), persistent=False)
        else:
            self.mask = None

        layers: list[enn.EquivariantModule] = []
        cur = self.in_type
        for i, (n, k) in enumerate(zip(cfg.fields, cfg.kernel_sizes, strict=True)):
            out = enn.FieldType(self.gspace, n * [self.gspace.regular_repr])
            layers += [
                StableR2Conv(cur, out, kernel_size=k, padding=k // 2, bias=False),
                _field_norm(cfg.norm, out),
                enn.ReLU(out, inplace=True),
            ]
            if i < len(cfg.fields) - 1:
                layers.append(enn.PointwiseAvgPoolAntialiased(out, sigma=cfg.pool_sigma, stride=2))
            cur = out
        self.features = enn.SequentialModule(*layers)
        self.gpool = enn.GroupPooling(cur)
        n_inv = self.gpool.out_type.size
        self.head = nn.Sequential(
            nn.Linear(n_inv, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.drop_rate),
            nn.Linear(cfg.hidden, cfg.num_outputs),
        )
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to the odd canvas and apply the disk mask (plain tensor in, plain tensor out)."""
        s = self.cfg.canvas
        if x.shape[-2:] != (s, s):
            shrink = x.shape[-2] > s or x.shape[-1] > s
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)
        if self.mask is not None:
            x = x * self.mask
        return x

    def invariant_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, F) rotation-invariant features, before the MLP."""
        g = enn.GeometricTensor(self.prepare(x), self.in_type)
        g = self.gpool(self.features(g))
        return g.tensor.mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.invariant_features(x))


