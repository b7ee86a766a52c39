"""FLOPs per sample, achieved TFLOP/s and model FLOP utilisation (MFU).

The model's FLOPs are counted once, over one forward pass of one sample, with
``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions and attention, a
multiply-add counting 2 FLOPs; elementwise operations, norms and the optimizer are left out, as MFU
conventionally does. A training step costs about 3x the forward pass (the backward pass computes the
gradients of both the activations and the weights, 2x the forward), so :func:`train_flops_per_sample`
is ``3 * forward``. This is the FLOPs of the model's maths, whatever ``torch.compile`` makes of it.

MFU is the achieved FLOP/s of one device over its dense (no sparsity) peak for the precision the
matrix products run in: ``bf16``/``fp16`` under autocast, and for ``fp32`` the TF32 peak when
``torch.set_float32_matmul_precision`` allows TF32, else the plain FP32 peak. The peaks come from
:data:`PEAKS`, matched against ``torch.cuda.get_device_name()``; a device not in the table (or a CPU)
has no MFU unless its peak is given (``log.peak_tflops``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one device, by the precision of its matrix products."""

    bf16: float
    fp16: float
    tf32: float
    fp32: float


# NVIDIA's data sheets; the tensor-core figures there are "with sparsity", so halved here.
# Most specific first: the first pattern that matches the device name wins.
_HOPPER_SXM = Peak(bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)
_HOPPER_NVL = Peak(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)
PEAKS: tuple[tuple[str, re.Pattern, Peak], ...] = (
    ("H200 NVL", re.compile(r"\bH200\b.*\bNVL\b", re.I), _HOPPER_NVL),
    ("H200 SXM", re.compile(r"\bH200\b", re.I), _HOPPER_SXM),
    ("H100 NVL", re.compile(r"\bH100\b.*\bNVL\b", re.I), _HOPPER_NVL),
    ("H100 PCIe", re.compile(r"\bH100\b.*\bPCIe\b", re.I), Peak(bf16=756.5, fp16=756.5, tf32=378, fp32=51)),
    ("H100 SXM", re.compile(r"\bH100\b", re.I), _HOPPER_SXM),  # "H100 80GB HBM3", "H100 SXM5"
    ("A100", re.compile(r"\bA100\b", re.I), Peak(bf16=312, fp16=312, tf32=156, fp32=19.5)),  # SXM4 and PCIe
)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts the CUDA attention kernels but not the CPU one; the same formula applies.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def forward_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one ``input_shape`` (C, H, W) sample.

    Run in eval mode without gradients, so that nothing the model holds (batch-norm statistics) or
    draws (dropout) changes; the model's mode is restored. Call it on the model before a parallel
    backend wraps it (DeepSpeed ZeRO-3 partitions the parameters).
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one training sample: forward and backward, 3x the forward."""
    return TRAIN_FLOPS_PER_FORWARD * forward_flops_per_sample(model, input_shape)


def device_peak(device_name: str) -> tuple[str, Peak] | None:
    """The table's entry for a ``torch.cuda.get_device_name()`` string, or None."""
    for label, pattern, peak in PEAKS:
        if pattern.search(device_name):
            return label, peak
    return None


def matmul_precision(precision: str) -> str:
    """The peak that applies to a training precision (``bf16``, ``fp16``, ``fp32``)."""
    if precision in ("bf16", "fp16"):
        return precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The dense peak of ``device`` for a training precision: ``override`` if given, else the table's
    (None on a CPU or on a GPU the table does not know)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    found = device_peak(torch.cuda.get_device_name(device))
    return getattr(found[1], matmul_precision(precision)) if found else None


def tflops(flops_per_sample: float, samples_per_s: float, devices: int = 1) -> float:
    """Achieved TFLOP/s per device, from the FLOPs of one sample and the throughput of all devices."""
    return flops_per_sample * samples_per_s / devices / 1e12


def mfu(flops_per_sample: float, samples_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOP utilisation, 0..1: achieved TFLOP/s per device over the peak (None without a peak)."""
    if not peak:
        return None
    return tflops(flops_per_sample, samples_per_s, devices) / peak


@dataclass(frozen=True)
class FlopRate:
    """A training run's FLOPs per sample and its devices' peak: turns samples/s into TFLOP/s and MFU."""

    train_flops_per_sample: int
    peak_tflops: float | None
    devices: int = 1

    def scalars(self, samples_per_s: float) -> dict[str, float]:
        """``perf/tflops`` (per device) and, where the peak is known, ``perf/mfu``; ``samples_per_s`` of all
        devices together."""
        out = {"perf/tflops": tflops(self.train_flops_per_sample, samples_per_s, self.devices)}
        utilisation = mfu(self.train_flops_per_sample, samples_per_s, self.peak_tflops, self.devices)
        if utilisation is not None:
            out["perf/mfu"] = utilisation
        return out

    def describe(self) -> str:
        forward = self.train_flops_per_sample / TRAIN_FLOPS_PER_FORWARD
        peak = (f"MFU against {self.peak_tflops:g} TFLOP/s per device" if self.peak_tflops
                else "no MFU: the device's peak is unknown (set log.peak_tflops)")
        return f"{forward / 1e9:.4g} GFLOP per sample forward, x{TRAIN_FLOPS_PER_FORWARD} to train; {peak}"


def flop_rate(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, precision: str,
              devices: int = 1, peak_override: float | None = None) -> FlopRate:
    """Count ``model``'s FLOPs (before a parallel backend wraps it) and look up the peak of ``device``
    for the training ``precision``."""
    return FlopRate(train_flops_per_sample(model, tuple(input_shape)),
                    peak_tflops(device, precision, peak_override), devices)
