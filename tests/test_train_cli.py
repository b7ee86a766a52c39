"""The train command's edges: strict config errors, TensorBoard events, run-dir layout."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lenstrain.cli import main
from shards.pack import TargetSpec, pack_shard_set
from tests.factories import RingSample, write_config
from tests.train_helpers import lenstrain


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=1e-3", "optim.lrr: unknown key; valid keys: name, lr"),
        ("optim.name=adamx", "optim.name: Input should be 'adam', 'adamw', 'radam', 'sgd' or 'lion'"),
        ("train.precision=fp8", "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("data.batch_size=0", "data.batch_size: Input should be greater than or equal to 1"),
        ("model.name=resnet9", "model.name: unknown model 'resnet9'; valid choices: "),
        ("parallel.strategy=fsdp", "parallel.strategy: Input should be 'single', 'ddp' or 'deepspeed'"),
        ("checkpoint.keep=abc", "checkpoint.keep: Input should be a valid integer"),
        ("data.shards=/nonexistent", "data.shards: /nonexistent is not a shard set"),
        # checked against the shard set before any work
        ("data.target=nope", "data.target: 'nope' is not a target of the shard set; valid choices: y, cls"),
        ("train.loss=ce", "train.loss: 'ce' does not fit a regression target"),
        ("data.batch_size=1000", "data.batch_size: a global batch of 1000 samples"),
        ("checkpoint.best_metric=val/auc", "checkpoint.best_metric: 'val/auc' is not measured for a regression"),
    ],
)
def test_bad_configs_exit_2_naming_the_dotted_path(tmp_path, ring_shards, override, expected, capsys):
    config = write_config(tmp_path / "c.yaml", ring_shards)
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--set", override])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        # an unknown keyword: the key, and the keywords alternet_tiny does take
        ("{nrm: gn}", ["'nrm'", "norm", "drop_rate", "drop_path"]),
        # a known keyword with a bad value: the key, the value, and the valid values
        ("{norm: xx}", ["norm", "'xx'", "bn, gn, ln"]),
    ],
)
def test_bad_model_kwargs_name_the_key_and_the_valid_choices(tmp_path, ring_shards, kwargs, named, capsys):
    config = write_config(tmp_path / "c.yaml", ring_shards)
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--set", f"model.kwargs={kwargs}"])
    assert code == 2
    line = next((line for line in capsys.readouterr().err.splitlines() if "model.kwargs: alternet_tiny" in line), "")
    for part in named:
        assert part in line, f"{part!r} missing from {line!r}"
    assert not (tmp_path / "run").exists()


def test_bad_config_exit_status_from_the_command_line(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards)
    proc = lenstrain("train", config, "--run-dir", tmp_path / "run", "--set", "train.max_stepz=3")
    assert proc.returncode == 2
    assert "train.max_stepz: unknown key" in proc.stderr


def test_job_file_with_resources_is_accepted(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 2})
    job = yaml.safe_load(config.read_text())
    job["resources"] = {"nodes": 1}
    config.write_text(yaml.safe_dump(job))
    proc = lenstrain("train", config, "--run-dir", tmp_path / "run", check=True)
    assert "step 2/2" in proc.stdout


def test_tensorboard_events_and_run_layout(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 6, "val_every_steps": 3},
                          log={"every_steps": 2, "images": True})
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, check=True)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step-00000006" / "COMPLETE").is_file()
    progress = json.loads((run / "progress.json").read_text())
    assert progress["state"] == "done" and progress["step"] == 6

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "val/mse", "val/mae", "val/r2"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/r2")] == [3, 6]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert "val/pred_vs_true" in tags["images"] and "data/train_batch" in tags["images"]


def test_incompatible_sections_are_rejected_before_work(tmp_path, ring_shards, capsys):
    config = write_config(tmp_path / "c.yaml", ring_shards)
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run"),
                 "--set", "model.channels_last=true", "--set", "parallel.strategy=deepspeed"])
    assert code == 2
    assert "model.channels_last is not supported with parallel.strategy 'deepspeed'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_set_without_validation_split_trains_with_a_warning(tmp_path):
    no_val = tmp_path / "no-val"
    pack_shard_set(no_val, sample_fn=RingSample(16), split_of=["train"] * 30 + ["test"] * 6,
                   targets=[TargetSpec("y", "regression")], primary_target="y", source={})
    config = write_config(tmp_path / "c.yaml", no_val, train={"max_steps": 3, "val_every_steps": 1})
    proc = lenstrain("train", config, "--run-dir", tmp_path / "run", check=True)
    assert "has no 'val' split: no validation" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
