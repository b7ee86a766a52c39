"""FLOPs per sample against hand counts, and the peak table's matching of device names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lenstrain.run.flops import (
    FlopRate,
    device_peak,
    flop_rate,
    forward_flops_per_sample,
    matmul_precision,
    mfu,
    peak_tflops,
    tflops,
    train_flops_per_sample,
)


def conv_linear_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(8 * 16 * 16, 10))


def test_conv_and_linear_flops_are_the_analytic_count():
    conv = 2 * (8 * 16 * 16) * (3 * 3 * 3)  # 2 FLOPs per multiply-add: each output sums 3x3x3 products
    linear = 2 * (8 * 16 * 16) * 10
    model = conv_linear_model()
    assert forward_flops_per_sample(model, (3, 16, 16)) == conv + linear
    assert train_flops_per_sample(model, (3, 16, 16)) == 3 * (conv + linear)


class Attention(nn.Module):
    def __init__(self, heads: int, tokens: int, dim: int):
        super().__init__()
        self.shape = (heads, tokens, dim)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x * self.scale).view(x.shape[0], *self.shape)
        return F.scaled_dot_product_attention(q, q, q).flatten(1)


def test_attention_on_the_cpu_is_counted():
    heads, tokens, dim = 2, 16, 8
    scores_and_mix = 2 * (2 * heads * tokens * tokens * dim)  # q @ k^T, then weights @ v
    assert forward_flops_per_sample(Attention(heads, tokens, dim), (heads * tokens * dim,)) == scores_and_mix


def test_counting_changes_nothing_in_the_model():
    model = conv_linear_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    forward_flops_per_sample(model, (3, 16, 16))
    assert model.training
    moved = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert not moved, f"batch-norm statistics moved: {moved}"
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize(("name", "label"), [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
])
def test_device_names_find_their_peaks(name, label):
    found = device_peak(name)
    assert found is not None and found[0] == label


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-32GB", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_devices_have_no_peak(name):
    assert device_peak(name) is None


def test_peaks_by_precision():
    _, h100 = device_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16, h100.fp16, h100.tf32, h100.fp32) == (989.5, 989.5, 494.5, 67.0)
    _, a100 = device_peak("NVIDIA A100-SXM4-40GB")
    assert (a100.bf16, a100.tf32, a100.fp32) == (312.0, 156.0, 19.5)


def test_fp32_uses_the_tf32_peak_only_when_torch_allows_tf32():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("fp32") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("fp32") == "tf32"
        assert matmul_precision("bf16") == "bf16"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_a_cpu_has_no_mfu_unless_a_peak_is_given():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "fp32") is None
    assert mfu(1e9, 100.0, peak_tflops(cpu, "fp32")) is None
    assert peak_tflops(cpu, "fp32", override=2.5) == 2.5


def test_tflops_and_mfu_are_per_device():
    assert tflops(2e9, 1e6) == pytest.approx(2000.0)
    assert tflops(2e9, 1e6, devices=2) == pytest.approx(1000.0)
    assert mfu(2e9, 1e6, peak=4000.0, devices=2) == pytest.approx(0.25)


def test_a_runs_flop_rate_gives_tflops_everywhere_and_mfu_with_a_peak():
    model, shape = conv_linear_model(), (3, 16, 16)
    on_cpu = flop_rate(model, shape, torch.device("cpu"), "fp32", devices=2)
    assert on_cpu == FlopRate(train_flops_per_sample(model, shape), None, 2)
    per_device = on_cpu.train_flops_per_sample * 1000.0 / 2 / 1e12
    assert on_cpu.scalars(1000.0) == {"perf/tflops": pytest.approx(per_device)}
    given = flop_rate(model, shape, torch.device("cpu"), "fp32", devices=2, peak_override=1e-6)
    scalars = given.scalars(1000.0)
    assert scalars["perf/mfu"] == pytest.approx(scalars["perf/tflops"] / 1e-6)
    assert "no MFU" in on_cpu.describe() and "1e-06 TFLOP/s" in given.describe()
