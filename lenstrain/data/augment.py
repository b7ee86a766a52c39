"""Rotations and flips of a batch, drawn per sample from (seed, epoch, index), on whatever device holds it.

Lensing labels do not change when an image is rotated or mirrored, so training draws, for every sample, an
angle in [0, 2 pi) and a horizontal flip from a generator seeded by (seed, epoch, sample index). The draws
depend on nothing else (not the worker, the batch, the rank or the device), so a resumed run sees the same
images, and the batch may be augmented in a loader worker (``data.augment.device: cpu``) or by the training
process on its own device (``device``) with the same draws. The flip is a ``torch.where`` over the batch and
the rotation one batched bilinear ``grid_sample``: no operation reads the device back on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_STREAM = 0xA46  # the generator's stream for augmentation draws


@dataclass(frozen=True)
class Augment:
    seed: int
    rotate: bool
    flip: bool

    @property
    def enabled(self) -> bool:
        return self.rotate or self.flip

    def draws(self, indices, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's rotation angle (radians) and whether it is flipped."""
        n = len(indices)
        angles = np.zeros(n)
        flips = np.zeros(n, dtype=bool)
        for k, i in enumerate(np.asarray(indices).tolist()):
            rng = np.random.default_rng([self.seed, epoch, int(i), _STREAM])
            angles[k] = rng.uniform(0, 2 * math.pi) if self.rotate else 0.0
            flips[k] = bool(rng.integers(2)) if self.flip else False
        return angles, flips

    def params(self, indices, epoch: int) -> torch.Tensor:
        """The draws as one small float32 tensor ``(3, B)``: cosine, sine, flip (0 or 1). A loader worker makes
        it, so that the training process only copies it to its device."""
        angles, flips = self.draws(indices, epoch)
        return torch.from_numpy(np.stack([np.cos(angles), np.sin(angles), flips]).astype(np.float32))

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) flipped and rotated as ``params`` (on the host, from :meth:`params`) say, on
        ``x``'s device; one copy of ``params`` to the device, nothing read back."""
        if not self.enabled:
            return x
        flipped = bool(params.numpy()[2].any())
        params = params.to(x.device, non_blocking=True)
        if flipped:
            x = torch.where(params[2].view(-1, 1, 1, 1) > 0, x.flip(-1), x)
        if self.rotate:
            grid = rotation_grid(params[0], params[1], x.shape[-2], x.shape[-1])
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x

    def __call__(self, x: torch.Tensor, indices, epoch: int) -> torch.Tensor:
        """``x`` rotated and flipped as drawn for ``indices`` in ``epoch``, on ``x``'s device."""
        return self.apply(x, self.params(indices, epoch)) if self.enabled else x


def rotation_grid(cos: torch.Tensor, sin: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid`` for pure rotations (align_corners=False), built by broadcasting on ``cos``'s device:
    the same sampling points to float rounding, at a fraction of the cost of its batched matrix product on CPU."""
    device = cos.device
    xs = (torch.linspace(-1, 1, w, device=device) * (w - 1) / w).view(1, 1, w)
    ys = (torch.linspace(-1, 1, h, device=device) * (h - 1) / h).view(1, h, 1)
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    grid = torch.empty(len(cos), h, w, 2, device=device)
    torch.sub(c * xs, s * ys, out=grid[..., 0])
    torch.add(s * xs, c * ys, out=grid[..., 1])
    return grid
