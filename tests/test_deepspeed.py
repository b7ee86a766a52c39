"""DeepSpeed ZeRO on CPU with real gloo process groups: training, preemption and exact resume."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenstrain.checkpointing.checkpoint import latest_complete, list_checkpoints, load_model_state, read_meta
from lenstrain.models import create_model
from lenstrain.run.preemption import EXIT_REQUEUE
from tests.factories import assert_same_weights, write_config
from tests.train_helpers import ROOT, env, lenstrain, train_until_signalled

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


@pytest.fixture(autouse=True)
def extensions_cache(monkeypatch):
    """DeepSpeed compiles its shared-memory op on first start (about 35 s); keep it across runs."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def ds_config(tmp_path, shards, stage: int, steps: int, every: int):
    return write_config(
        tmp_path / "c.yaml",
        shards,
        train={"max_steps": steps, "grad_clip": 1.0},
        parallel={"strategy": "deepspeed", "zero_stage": stage},
        checkpoint={"every_steps": every, "keep": 3, "every_minutes": None},
    )


def assert_plain_state_dict(state: dict) -> None:
    model = create_model("alternet_tiny", in_channels=1, num_outputs=1, image_size=32)
    assert list(state) == list(model.state_dict()), "keys and order of the unwrapped model's state dict"
    model.load_state_dict(state)  # strict
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
def test_zero_signal_and_resume_is_bit_identical(tmp_path, ring_shards, stage):
    steps = 6
    config = ds_config(tmp_path, ring_shards, stage=stage, steps=steps, every=2)
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, "--nproc", 2, check=True)

    resumed = tmp_path / "resumed"
    code, out = train_until_signalled(config, resumed, at_step=random.Random(stage).randint(2, 4), nproc=2)
    assert code == EXIT_REQUEUE, out
    stopped = max(s for s, _ in list_checkpoints(resumed / "checkpoints"))
    assert stopped < steps
    second = lenstrain("train", config, "--run-dir", resumed, "--nproc", 2, check=True)
    assert f"(step {stopped}, epoch" in second.stdout, second.stdout

    last = latest_complete(straight / "checkpoints")
    assert (last / "deepspeed").is_dir() and (last / "scheduler.pt").is_file()
    assert not (last / "model.pt").exists()  # the engine's collective checkpoint holds the model
    final = load_model_state(last)
    assert_plain_state_dict(final)
    assert_same_weights(final, load_model_state(latest_complete(resumed / "checkpoints")))


def test_zero3_resume_from_a_partitioned_checkpoint_is_bit_identical(tmp_path, ring_shards):
    """Parameters partitioned too: resume from the straight run's mid-run checkpoint, in a new run."""
    config = ds_config(tmp_path, ring_shards, stage=3, steps=6, every=3)
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, "--nproc", 2, check=True)
    mid = straight / "checkpoints" / "step-00000003"
    assert mid.is_dir()

    resumed = tmp_path / "resumed"
    shutil.copytree(mid, resumed / "checkpoints" / mid.name)
    second = lenstrain("train", config, "--run-dir", resumed, "--nproc", 2, check=True)
    assert "(step 3, epoch" in second.stdout, second.stdout

    final = load_model_state(latest_complete(straight / "checkpoints"))
    assert_plain_state_dict(final)
    assert_same_weights(final, load_model_state(latest_complete(resumed / "checkpoints")))


def resume_on_one_rank(tmp_path, shards, strategy: str) -> tuple[Path, Path, str]:
    """A 2-rank run of 8 steps, and a 1-rank run resumed from its step-4 checkpoint: (straight, resumed, output)."""
    config = write_config(
        tmp_path / f"{strategy}.yaml",
        shards,
        train={"max_steps": 8, "grad_clip": 1.0},
        parallel={"strategy": strategy, "zero_stage": 2},
        checkpoint={"every_steps": 4, "keep": 3, "every_minutes": None},
    )
    straight, resumed = tmp_path / f"{strategy}-straight", tmp_path / f"{strategy}-resumed"
    lenstrain("train", config, "--run-dir", straight, "--nproc", 2, check=True)
    shutil.copytree(straight / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    out = lenstrain("train", config, "--run-dir", resumed, "--nproc", 1, check=True).stdout
    return straight, resumed, out


def test_zero2_resumes_on_another_world_size_with_the_samples_accounted_as_ddp(tmp_path, ring_shards):
    """2 ranks -> 1: the global batch is kept and the cursor goes on exactly as with DDP (and as without the change);
    ZeRO's partitions are resharded through DeepSpeed's universal layout, buffers included."""
    runs = {
        strategy: resume_on_one_rank(tmp_path, ring_shards, strategy) for strategy in ("ddp", "deepspeed")
    }
    finals = {}
    for strategy, (straight, resumed, out) in runs.items():
        assert "world size changed: keeping the global batch of 8 with 8 samples per rank" in out, out
        assert "(step 4, epoch 0, 32 samples seen)" in out, out
        meta, straight_meta = (read_meta(latest_complete(run / "checkpoints")) for run in (resumed, straight))
        assert meta["world_size"] == 1 and meta["train_state"]["step"] == 8
        assert meta["cursor"] == straight_meta["cursor"], (strategy, meta["cursor"], straight_meta["cursor"])
        assert not list((resumed / "checkpoints").glob(".reshard-*"))  # the converted copy is removed
        finals[strategy] = load_model_state(latest_complete(resumed / "checkpoints"))
    ddp, zero = finals["ddp"], finals["deepspeed"]
    assert ddp.keys() == zero.keys()
    for key in ddp:
        if ddp[key].is_floating_point():  # ZeRO's reductions differ from DDP's in the last bits only
            assert torch.allclose(ddp[key], zero[key], atol=1e-3), key
        else:  # batch-norm step counts: restored, not restarted
            assert torch.equal(ddp[key], zero[key]), key


def test_deepspeed_is_imported_only_when_a_deepspeed_backend_is_built():
    code = (
        "import sys, lenstrain.parallel, lenstrain.checkpointing.checkpoint, lenstrain.run.train, lenstrain.evaluation.evaluate; "
        "from lenstrain.parallel import BACKENDS; "
        "assert set(BACKENDS) == {'single', 'ddp', 'deepspeed'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_a_failed_deepspeed_file_write_is_raised_after_the_engine_save(tmp_path):
    """The engine's save carries on (every rank meets its barrier); the OSError comes after, naming the file."""
    from lenstrain.parallel.deepspeed_files import ListedFilesCheckpointEngine

    files = ListedFilesCheckpointEngine()
    files.save({"w": torch.ones(3)}, str(tmp_path / "missing-dir" / "mp_rank_00_model_states.pt"))
    files.save({"w": torch.ones(3)}, str(tmp_path / "written-after-a-failure.pt"))
    assert not (tmp_path / "written-after-a-failure.pt").exists()
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt"):
        files.raise_write_error()
    files.raise_write_error()  # raised once


FLAGGED_STEP = """
import torch
from lenstrain.config.schema import OptimConfig
from lenstrain.parallel.distributed import DistInfo
from lenstrain.optimization.optimizers import build_optimizer
from lenstrain.parallel import build_backend

info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def zero2():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = build_optimizer(OptimConfig(name="{name}"), model)
    return build_backend("deepspeed", model, optimizer, info, precision="fp32", grad_clip=1.0, zero_stage=2), model


def step(backend, skip):
    backend.accumulating(last=True)
    backend.backward(backend.train_module(x).pow(2).mean())  # finite: only the flag says skip
    backend.step(skip=torch.tensor(skip))


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


flagged, flagged_model = zero2()
plain, plain_model = zero2()
step(flagged, True)  # a flagged first step leaves fresh state: it then trains as if it never happened
print("first", same(flagged_model, plain_model))
for _ in range(2):
    step(flagged, False)
    step(plain, False)
print("fresh", same(flagged_model, plain_model))
before = [p.detach().clone() for p in flagged_model.parameters()]
step(flagged, True)
print("flagged", all(torch.equal(a, p) for a, p in zip(before, flagged_model.parameters())))
"""


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_zero_skips_a_flagged_step_even_with_finite_gradients(tmp_path, name):
    """The flag reaches the fused optimizer that ZeRO steps on its partition: the weights and the state stay as
    they were, a first step's included (fused SGD's momentum buffers)."""
    script = tmp_path / "flagged.py"
    script.write_text(FLAGGED_STEP.replace("{name}", name))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [
        line for line in out.stdout.splitlines() if line.split(" ")[0] in ("first", "fresh", "flagged")
    ] == ["first True", "fresh True", "flagged True"], out.stdout
