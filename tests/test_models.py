"""Model zoo tests, driven by the registry: every registered model runs forward and backward on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lenstrain.models import UnknownModelError, create_model, list_models
from lenstrain.models.blocks import MSABlock, WindowAttention

MODELS = list_models()
# Also checked at 150x150 with 3 channels and 3 outputs.
FULL_CHECK = ("resnet18", "alternet_tiny", "xresnet_alternet_18")
# Models above this size are only counted (on the meta device), not run: CI has 2 cores.
HUGE = 100_000_000
ROOT = Path(__file__).resolve().parents[1]



def test_the_index_names_every_model_with_the_family_that_registers_it():
    from lenstrain.models import registry

    registry._import_families()
    assert registry.family_index() == {name: fn.__module__ for name, fn in registry._REGISTRY.items()}
    assert list_models() == sorted(registry._REGISTRY)


def test_naming_or_building_a_model_imports_its_family_only():
    """A config names its model: checking it (and building the model) imports no other family, so a
    training process of a small model does not import escnn or torchvision's model zoo."""
    code = ("import sys; from lenstrain.models import create_model; "
            "from lenstrain.config.schema import ModelConfig; ModelConfig(name='resnet18'); create_model('resnet18'); "
            "print(sorted(m for m in sys.modules if m.startswith('lenstrain.models.')), 'escnn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.split("\n")[-2] == "['lenstrain.models.blocks', 'lenstrain.models.registry', 'lenstrain.models.resnet'] False"


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_num_params(name: str, **kw) -> int | None:
    """Parameter count without allocating or initialising weights; None when a family cannot be
    built on the meta device (e.g. one that computes its filter bases from tensor values)."""
    try:
        with torch.device("meta"):
            return num_params(create_model(name, **kw))
    except Exception:
        return None


def build_or_skip(name: str, **kw) -> nn.Module:
    n = meta_num_params(name, **kw)
    if n is not None and n > HUGE:
        pytest.skip(f"{name}: {n / 1e6:.0f}M params, counted on meta only")
    torch.manual_seed(0)
    model = create_model(name, **kw)
    if n is None and num_params(model) > HUGE:
        pytest.skip(f"{name}: {num_params(model) / 1e6:.0f}M params, too big to run here")
    return model


def first_param_module(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The first module with parameters of its own that the forward pass calls."""
    called: list[nn.Module] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _args: called.append(mod))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train()
    assert called, "the forward pass used no parameters"
    return called[0]


def check_forward_backward(model: nn.Module, batch: int, channels: int, size: int, outputs: int) -> None:
    x = torch.randn(batch, channels, size, size)
    first = first_param_module(model, x)
    model.train()
    y = model(x)
    assert y.shape == (batch, outputs)
    assert torch.isfinite(y).all()
    y.float().square().mean().backward()
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"
    grads = [p.grad for p in first.parameters(recurse=False) if p.requires_grad]
    assert grads and all(g is not None for g in grads), f"no gradient reaches the first layer {first}"
    assert any(g.abs().sum() > 0 for g in grads), f"zero gradient at the first layer {first}"


# --------------------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_64(name: str) -> None:
    model = build_or_skip(name, in_channels=1, num_outputs=1, image_size=64)
    check_forward_backward(model, batch=2, channels=1, size=64, outputs=1)


@pytest.mark.parametrize("name", FULL_CHECK)
def test_forward_backward_150_rgb(name: str) -> None:
    model = build_or_skip(name, in_channels=3, num_outputs=3, image_size=150)
    check_forward_backward(model, batch=2, channels=3, size=150, outputs=3)


@pytest.mark.parametrize("name", ["alternet_tiny", "xresnet_alternet_18", "resnet18"])
@pytest.mark.parametrize("norm", ["gn", "ln"])
def test_norm_and_dropout_options(name: str, norm: str) -> None:
    kw = {} if name.startswith("resnet") else {"drop_path": 0.1}
    model = create_model(name, image_size=64, norm=norm, drop_rate=0.2, **kw)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    check_forward_backward(model, batch=2, channels=1, size=64, outputs=1)


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown norm 'batchnorm'; choose one of bn, gn, ln"):
        create_model("alternet_tiny", norm="batchnorm")


# --------------------------------------------------------------------------- registry


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as err:
        create_model("resnet19")
    msg = str(err.value)
    assert "Unknown model" in msg and "resnet19" in msg
    for name in MODELS:
        assert name in msg
    assert isinstance(err.value, KeyError)


def test_registry_holds_the_families() -> None:
    expected = {
        "resnet18", "resnet34", "resnet50", "resnet101",
        "alternet_tiny", "alternet_18", "alternet_50", "alternet_large",
        "xresnet_alternet_18", "xresnet_alternet_50",
    }  # fmt: skip
    assert expected <= set(MODELS)
    assert sorted(MODELS) == MODELS


def test_param_counts() -> None:
    assert 20e6 <= meta_num_params("alternet_50") <= 60e6
    assert meta_num_params("alternet_large") >= 150e6
    assert meta_num_params("alternet_tiny") < 1e6
    assert 10e6 <= meta_num_params("resnet18") <= 12e6


# --------------------------------------------------------------------------- windowed attention


def reference_window_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Windowed attention computed window by window over the real pixels only (no padding)."""
    b, _, h, w = x.shape
    win, heads, d = attn.window, attn.heads, attn.dim_head
    out = x.new_zeros(b, attn.proj.out_features, h, w)
    for r0 in range(0, h, win):
        for c0 in range(0, w, win):
            coords = [(r, c) for r in range(r0, min(r0 + win, h)) for c in range(c0, min(c0 + win, w))]
            n = len(coords)
            tok = torch.stack([x[:, :, r, c] for r, c in coords], dim=1)  # (B, n, C)
            q, k, v = attn.qkv(tok).view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            idx = torch.tensor(
                [[(r1 - r2 + win - 1) * (2 * win - 1) + (c1 - c2 + win - 1) for r2, c2 in coords] for r1, c1 in coords]
            )
            bias = attn.rel_bias_table[idx].permute(2, 0, 1)  # (heads, n, n)
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
            o = attn.proj((a @ v).transpose(1, 2).reshape(b, n, heads * d))  # (B, n, C_out)
            for i, (r, c) in enumerate(coords):
                out[:, :, r, c] = o[:, i]
    return out


@pytest.mark.parametrize("hw", [(10, 13), (3, 6), (7, 14), (2, 2)])
def test_window_attention_pads_and_masks(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(8, 12, heads=2, dim_head=4, window=7).eval()
    with torch.no_grad():
        attn.rel_bias_table.normal_()  # make the position bias matter
    x = torch.randn(2, 8, *hw)
    y = attn(x)
    assert y.shape == (2, 12, *hw)
    torch.testing.assert_close(y, reference_window_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_msa_block_on_map_not_a_multiple_of_window() -> None:
    torch.manual_seed(0)
    block = MSABlock(16, heads=2, dim_head=8, window=7, expansion=2).eval()
    x = torch.randn(2, 16, 10, 13, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    # Windows do not talk to each other: a change in the bottom-right (partial) window
    # leaves the top-left window alone and changes its own window.
    x2 = x.detach().clone()
    x2[:, :, 8, 11] += 1.0
    with torch.no_grad():
        y1, y2 = block(x.detach()), block(x2)
    torch.testing.assert_close(y1[:, :, :7, :7], y2[:, :, :7, :7])
    assert not torch.allclose(y1[:, :, 7:, 7:], y2[:, :, 7:, 7:])
