"""No host-device sync on the hot path: between host steps (log, validation, checkpoint), the loop and its
backend read no tensor on the host; and the device-side skip of a non-finite step is exact."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import lenstrain
import lenstrain.run.train as train_module
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.config.schema import OptimConfig, load_config
from lenstrain.optimization.optimizers import OPTIMIZERS, build_optimizer
from lenstrain.parallel import build_backend
from lenstrain.parallel.distributed import DistInfo
from lenstrain.run.preemption import EXIT_NONFINITE
from lenstrain.run.train import run_training
from tests.factories import config_dict

# Each of these makes the host wait for the device when the tensor lives there.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
LENSTRAIN = str(Path(lenstrain.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
# Reads of tensors that live on the CPU by construction, never waiting for a device: Adam's step count (a CPU
# tensor even beside GPU parameters) and the DataLoader's seed draw at each epoch's start.
CPU_ONLY = (str(Path(TORCH) / "optim"), str(Path(TORCH) / "utils" / "data"))


def read_by_lenstrain() -> bool:
    """Whether the read was asked for by lenstrain's code (directly or through torch, not of a CPU_ONLY tensor)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        if frame.f_code.co_filename.startswith(CPU_ONLY):
            return False
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(LENSTRAIN)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts of host reads of tensors by lenstrain, per step of the loop (keyed by the step taken)."""
    counts: dict[int, int] = defaultdict(int)
    current = {"step": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if read_by_lenstrain():
                counts[current["step"]] += 1
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    take_step = train_module.take_step

    def counted_step(run):
        current["step"] = run.state.step + 1
        return take_step(run)

    monkeypatch.setattr(train_module, "take_step", counted_step)
    return counts


def test_steps_between_host_steps_read_nothing_on_the_host(tmp_path, ring_shards, host_reads):
    cfg = load_config(
        config_dict(
            ring_shards,
            train={"max_steps": 16},
            log={"every_steps": 4},
            checkpoint={"every_steps": 8, "every_minutes": None},
        )
    )
    assert run_training(cfg, tmp_path / "run") == 0
    host_steps = {4, 8, 12, 16}
    assert all(host_reads[step] > 0 for step in host_steps)  # the counter sees the logging's reads
    assert {step: host_reads[step] for step in range(1, 17) if step not in host_steps} == {
        step: 0 for step in range(1, 17) if step not in host_steps
    }


SKIP_KINDS = {
    "adam": "found_inf",
    "adamw": "found_inf",
    "sgd": "found_inf",
    "radam": "masked",
    "lion": "masked",
}


def backend_and_params(name: str = "adamw", precision: str = "fp32", seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = build_optimizer(OptimConfig(name=name, lr=1e-2, weight_decay=0.1), model)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return build_backend("single", model, optimizer, info, precision=precision, grad_clip=1.0), model


def one_step(backend, model, x, skip):
    with backend.autocast():
        loss = model(x).float().pow(2).mean()
    backend.backward(loss)
    backend.step(skip=skip)


def snapshot(backend, model) -> list[torch.Tensor]:
    state = [v.clone() for s in backend.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in model.parameters()] + state


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_optimizer_has_its_skip_and_adam_adamw_sgd_skip_without_a_copy():
    assert set(SKIP_KINDS) == set(OPTIMIZERS)
    for name, kind in SKIP_KINDS.items():
        backend, _ = backend_and_params(name)
        assert backend.skippable.kind == kind, name
        assert (backend.skippable.masked is None) == (kind == "found_inf")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SKIP_KINDS))
def test_a_skipped_step_leaves_weights_and_optimizer_state_bit_identical(name, precision):
    x = torch.randn(16, 4)
    plain, plain_model = backend_and_params(name, precision)
    skipping, skipping_model = backend_and_params(name, precision)
    for _ in range(3):  # steps not skipped update exactly as plain ones
        one_step(plain, plain_model, x, skip=False)
        one_step(skipping, skipping_model, x, skip=torch.tensor(False))
    assert same(snapshot(plain, plain_model), snapshot(skipping, skipping_model))
    before = snapshot(skipping, skipping_model)
    one_step(skipping, skipping_model, x * float("nan"), skip=torch.tensor(True))
    skipping.settle_skip(True)
    assert same(before, snapshot(skipping, skipping_model))


@pytest.mark.parametrize("name", list(SKIP_KINDS))
def test_a_skipped_first_step_leaves_state_that_steps_as_fresh(name):
    x = torch.randn(16, 4)
    plain, plain_model = backend_and_params(name)
    skipping, skipping_model = backend_and_params(name)
    one_step(skipping, skipping_model, x * float("nan"), skip=torch.tensor(True))
    skipping.settle_skip(True)
    for _ in range(2):
        one_step(plain, plain_model, x, skip=False)
        one_step(skipping, skipping_model, x, skip=torch.tensor(False))
    assert same(list(plain_model.parameters()), list(skipping_model.parameters()))


def test_a_loss_made_non_finite_without_non_finite_gradients_is_still_skipped():
    """The skip follows the flag, not the gradients: finite gradients of a step flagged non-finite are not applied."""
    x = torch.randn(16, 4)
    for name in SKIP_KINDS:
        for precision in ("fp32", "fp16"):
            backend, model = backend_and_params(name, precision)
            one_step(backend, model, x, skip=False)
            before = snapshot(backend, model)
            one_step(backend, model, x, skip=torch.tensor(True))
            backend.settle_skip(True)
            assert same(before, snapshot(backend, model)), (name, precision)


def test_nan_policy_skip_skips_then_stops_past_max_skipped_steps(tmp_path, ring_shards, capsys):
    cfg = load_config(
        config_dict(
            ring_shards,
            optim={"name": "sgd", "lr": 1e12},
            train={"max_steps": 30, "grad_clip": None, "nan_policy": "skip", "max_skipped_steps": 2},
            log={"every_steps": 5},
            checkpoint={"every_steps": 0, "every_minutes": None},
        )
    )
    run = RunDir(tmp_path / "run")
    assert run_training(cfg, run.root) == EXIT_NONFINITE
    out = capsys.readouterr().out
    assert out.count("skipping its update") == 2 and "(2 skipped so far, at most 2)" in out
    assert "; stopping." in out
