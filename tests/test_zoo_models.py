"""Model zoo: equivariance of the steerable CNNs, and shapes/options of every zoo family."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from torchvision.transforms.functional import InterpolationMode, rotate

from lenstrain.models import create_model, list_models

ZOO = [
    "escnn_c8",
    "escnn_d8",
    "efficientnetv2_s",
    "efficientnetv2_m",
    "mresunet",
    "attention_unet",
    "residual_attention_56",
]


def gaussian_blobs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) smooth images: three gaussian blobs each, well inside the inscribed disk."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c = (size - 1) / 2
    imgs = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(3):
            r, th, s, a = torch.rand(4, generator=g).tolist()
            r, th, s, a = 0.3 * size * r, 2 * math.pi * th, (0.04 + 0.04 * s) * size, 0.5 + a
            cx, cy = c + r * math.cos(th), c + r * math.sin(th)
            imgs[i, 0] += a * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return imgs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-sample ||a - b|| / ||b||."""
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.fixture(scope="module", params=["escnn_c8", "escnn_d8"])
def steerable(request):
    """An escnn model in eval mode, its batch-norm statistics first warmed up on smooth images."""
    torch.manual_seed(0)
    model = create_model(request.param, num_outputs=8)
    model.train()
    for m in model.modules():  # one pass sets the running statistics to this batch's
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model(gaussian_blobs(8, 150, seed=100))
    return request.param, model.eval()


@pytest.mark.parametrize("size", [150, 64])
def test_steerable_invariant_to_right_angle_rotations(steerable, size):
    name, model = steerable
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        for k in (1, 2, 3):
            yr = model(torch.rot90(x, k, dims=(-2, -1)))
            assert _rel_err(yr, y) < 1e-4, (name, size, k)


def test_steerable_flip(steerable):
    name, model = steerable
    x = torch.randn(2, 1, 150, 150, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
        err_h = _rel_err(model(torch.flip(x, dims=(-1,))), y)
        err_v = _rel_err(model(torch.flip(x, dims=(-2,))), y)
    print(f"{name}: flip relative error horizontal {err_h:.2e}, vertical {err_v:.2e}")
    if name == "escnn_d8":
        assert err_h < 1e-4 and err_v < 1e-4
    else:  # C8 has no reflections: a flip is not a symmetry of the model
        assert err_h > 1e-3


@pytest.mark.parametrize("size", [150, 64])
def test_steerable_nearly_invariant_at_45_degrees(steerable, size, record_property):
    """45 degrees is in C8/D8, but not a symmetry of the pixel grid: the error is discretisation only."""
    name, model = steerable
    x = gaussian_blobs(4, size)
    xr = rotate(x, 45.0, interpolation=InterpolationMode.BILINEAR)
    with torch.no_grad():
        err = _rel_err(model(xr), model(x))
    print(f"{name} @ {size}px: relative output error under a 45 degree rotation: {err:.3g}")
    record_property(f"{name}_{size}_rot45_rel_err", err)
    # Measured: C8 0.03, D8 0.05-0.10 from run to run (0.101 once on a fresh clone); a ResNet-18 treated the
    # same way gives 0.49, so the bound still tells an equivariant model from one that is not.
    assert err < 0.15


def test_steerable_group_norm_keeps_invariance():
    torch.manual_seed(0)
    model = create_model("escnn_c8", norm="gn", num_outputs=4).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert _rel_err(model(torch.rot90(x, 1, dims=(-2, -1))), model(x)) < 1e-4


def test_steerable_checkpoint_keys_do_not_depend_on_mode():
    """escnn caches expanded filters in eval mode; saving/loading must not see that cache."""
    torch.manual_seed(0)
    src = create_model("escnn_c8", num_outputs=2)
    train_keys = set(src.train().state_dict())
    assert set(src.eval().state_dict()) == train_keys
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    src.train()
    state = src.state_dict()
    src.eval()
    dst = create_model("escnn_c8", num_outputs=2).eval()
    dst.load_state_dict(state)  # strict; the eval-mode filter cache is rebuilt from the loaded weights
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
        torch.testing.assert_close(copy.deepcopy(dst)(x), src(x))


@pytest.mark.parametrize("name", ZOO)
def test_registered(name):
    assert name in list_models()


@pytest.mark.parametrize("name", ZOO)
def test_shapes_at_150_and_64(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_outputs=3, image_size=150).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 150, 150)).shape == (2, 3)
    model = create_model(name, in_channels=1, num_outputs=1, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1)


@pytest.mark.parametrize("name", ZOO)
def test_group_norm_and_dropout(name):
    torch.manual_seed(0)
    model = create_model(name, image_size=64, norm="gn", drop_rate=0.2, num_outputs=2).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())
    with torch.no_grad():  # train mode: dropout active, group norm needs no batch statistics
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mresunet", "attention_unet", "residual_attention_56", "efficientnetv2_s"])
def test_odd_sizes_with_layer_norm(name):
    """Non-square sizes not divisible by 2^depth must work (the U-Nets resample to each skip's size)."""
    torch.manual_seed(0)
    model = create_model(name, norm="ln").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 75, 83)).shape == (2, 1)


@pytest.mark.parametrize("name", ZOO)
def test_unknown_norm_rejected(name):
    with pytest.raises(ValueError, match="norm 'batch'; choose one of bn, gn, ln"):
        create_model(name, norm="batch")
