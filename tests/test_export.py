"""``lenstrain export``: one plain fp32 state dict and its description, from single, DDP and ZeRO-3 runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lenstrain.checkpointing.checkpoint import latest_complete, list_checkpoints, load_model_state, read_meta
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.evaluation.export import export_run, info_path, load_exported, predict
from shards.reader import ShardReader
from tests.factories import write_config
from tests.train_helpers import ROOT, env, lenstrain

# A fresh interpreter loads the file as a user would, without lenstrain's export code, then through
# load_exported; DeepSpeed must not have been imported by either.
LOAD_IN_A_FRESH_PROCESS = """
import json, sys
import torch
from lenstrain.models import create_model
path = sys.argv[1]
if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    state = load_file(path)
else:
    state = torch.load(path, map_location="cpu", weights_only=True)
spec = json.load(open(path.rsplit(".", 1)[0] + ".json"))["model"]
model = create_model(spec["name"], in_channels=spec["in_channels"], num_outputs=spec["num_outputs"],
                     image_size=spec["image_size"], **spec["kwargs"])
model.load_state_dict(state, strict=True)
from lenstrain.evaluation.export import load_exported
load_exported(path)
assert "deepspeed" not in sys.modules, "deepspeed was imported"
assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
print("loaded", len(state))
"""


def assert_loads_without_deepspeed(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(path)], capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("loaded"), proc.stdout


def assert_exported_weights_are(path: Path, step_dir: Path) -> None:
    model, info = load_exported(path)
    expected = load_model_state(step_dir)
    exported = model.state_dict()
    assert list(exported) == list(expected)
    for key, value in expected.items():
        assert torch.equal(exported[key], value.float() if value.is_floating_point() else value), key
    assert info["source"]["step"] == read_meta(step_dir)["step"]


def train(tmp_path: Path, shards: Path, nproc: int = 1, **sections) -> Path:
    config = write_config(tmp_path / "config.yaml", shards, **sections)
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, "--nproc", nproc, check=True)
    return run


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, ring_shards):
    # A large learning rate makes the validation loss jump about: the best checkpoint is not the newest.
    return train(tmp_path_factory.mktemp("single"), ring_shards, parallel={"strategy": "single"},
                 optim={"lr": 0.1}, train={"max_steps": 6, "val_every_steps": 2},
                 checkpoint={"every_steps": 2, "keep": 3})


@pytest.mark.slow  # export, predict and a fresh interpreter as subprocesses
def test_a_single_process_export_predicts_as_the_run_does(tmp_path, single_run, ring_shards):
    out = tmp_path / "export" / "model.safetensors"
    lenstrain("export", single_run, "--out", out, check=True)
    assert info_path(out) == out.parent / "model.json" and info_path(out).is_file()
    newest = latest_complete(RunDir(single_run).checkpoints)
    assert_exported_weights_are(out, newest)
    assert_loads_without_deepspeed(out)

    csv_path = tmp_path / "preds.csv"
    lenstrain("predict", single_run, "--shards", ring_shards, "--split", "test", "--out", csv_path,
              "--checkpoint", "latest", check=True)
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    reader = ShardReader(ring_shards, "test")
    images = np.stack([reader.read(int(row["index"]))[0] for row in rows])
    model, info = load_exported(out)  # the two files alone: normalisation, model and decoding
    assert info["target"]["scaling"] == "standard" and info["target"]["scale"] != 1.0  # decoding is exercised
    # In the run's batches of 4 (data.batch_size), so the arithmetic is the same as predict's
    ours = torch.cat([predict(model, info, images[i : i + 4]) for i in range(0, len(images), 4)])
    theirs = torch.tensor([float(row["y"]) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-7, atol=0.0)  # the CSV has 8 significant digits


def test_step_and_best_choose_those_checkpoints(tmp_path, single_run):
    root = RunDir(single_run).checkpoints
    export_run(single_run, tmp_path / "step2.pt", step=2, log=lambda message: None)
    assert_exported_weights_are(tmp_path / "step2.pt", root / "step-00000002")

    losses = {step: read_meta(path)["metrics"]["val/loss"] for step, path in list_checkpoints(root)}
    best = min(losses, key=losses.get)
    assert best != max(losses), f"the test needs a best checkpoint other than the newest: {losses}"
    info = export_run(single_run, tmp_path / "best.safetensors", best=True, log=lambda message: None)
    assert info["source"]["step"] == best
    assert_exported_weights_are(tmp_path / "best.safetensors", root / f"step-{best:08d}")


def test_unusable_requests_exit_2_and_say_why(tmp_path, single_run):
    missing = lenstrain("export", single_run, "--step", 3, "--out", tmp_path / "m.pt")
    assert missing.returncode == 2
    assert "--step 3: no such checkpoint" in missing.stderr and "2, 4, 6" in missing.stderr, missing.stderr
    suffix = lenstrain("export", single_run, "--out", tmp_path / "m.bin")
    assert suffix.returncode == 2 and ".safetensors or .pt" in suffix.stderr, suffix.stderr
    assert not list(tmp_path.iterdir())


def test_model_json_holds_what_predicting_needs(tmp_path, single_run, ring_shards):
    export_run(single_run, tmp_path / "model.pt", log=lambda message: None)
    info = json.loads((tmp_path / "model.json").read_text())
    manifest = json.loads((ring_shards / "manifest.json").read_text())
    assert info["model"] == {"name": "alternet_tiny", "in_channels": 1, "num_outputs": 1, "image_size": 32,
                             "kwargs": {}}
    assert info["input"]["shape"] == [1, 32, 32] and info["input"]["normalize"] == "global"
    assert info["input"]["mean"] == manifest["image"]["stats"]["mean"]
    stats = manifest["targets"]["y"]["stats"]
    target = info["target"]
    assert (target["name"], target["kind"], target["loss"]) == ("y", "regression", "mse")
    assert (target["shift"], target["scale"]) == (stats["mean"], stats["std"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_ddp_run_exports_its_replicated_weights(tmp_path, ring_shards):
    run = train(tmp_path, ring_shards, nproc=2, parallel={"strategy": "ddp"}, train={"max_steps": 2},
                checkpoint={"every_steps": 2})
    out = tmp_path / "ddp.pt"
    lenstrain("export", run, "--out", out, check=True)
    assert_exported_weights_are(out, latest_complete(RunDir(run).checkpoints))
    assert_loads_without_deepspeed(out)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.multiprocess
def test_a_zero3_run_exports_its_consolidated_partitions(tmp_path, ring_shards, monkeypatch):
    pytest.importorskip("deepspeed")
    # DeepSpeed compiles its shared-memory op on first start; keep it across runs (as test_deepspeed does)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    run = train(tmp_path, ring_shards, nproc=2, parallel={"strategy": "deepspeed", "zero_stage": 3},
                train={"max_steps": 2, "grad_clip": 1.0}, checkpoint={"every_steps": 2})
    step_dir = latest_complete(RunDir(run).checkpoints)
    assert (step_dir / "deepspeed").is_dir() and not (step_dir / "model.pt").exists()
    out = tmp_path / "zero3.safetensors"
    lenstrain("export", run, "--out", out, check=True)
    assert_exported_weights_are(out, step_dir)
    assert_loads_without_deepspeed(out)
