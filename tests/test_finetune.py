"""Fine-tuning (``model.init_from``, ``init_skip``, ``init_strict``) and ``predict --images``, through the real
``python -m lenstrain`` and ``python -m launcher`` commands on the ring shard set."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lenstrain.checkpointing.finetune import parse_init_from
from lenstrain.checkpointing.rundir import RunDir
from tests.factories import final_weights, write_config
from tests.train_helpers import lenstrain


@pytest.fixture(scope="module")
def source(tmp_path_factory, ring_shards) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 and validation at each."""
    root = tmp_path_factory.mktemp("finetune")
    config = write_config(root / "src.yaml", ring_shards, train={"max_steps": 6, "val_every_steps": 3},
                          checkpoint={"every_steps": 3, "keep": 5, "best_metric": "val/r2"})
    lenstrain("train", config, "--run-dir", root / "src", check=True)
    return root / "src"


def _weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    from lenstrain.checkpointing.checkpoint import load_model_state, step_dir_name

    return load_model_state(RunDir(run).checkpoints / step_dir_name(step))


def test_init_from_a_run_step_best_and_an_export(tmp_path, ring_shards, source):
    assert parse_init_from("runs/x@best") == (Path("runs/x"), "best")
    assert parse_init_from("runs/x@12") == (Path("runs/x"), "12")
    assert parse_init_from("w.safetensors") == (Path("w.safetensors"), None)
    lenstrain("export", source, "--step", "3", "--out", tmp_path / "w.safetensors", check=True)
    for ref, step in ((f"{source}@3", 3), (str(source), 6), (str(tmp_path / "w.safetensors"), 3)):
        run = tmp_path / f"ft-{step}-{Path(ref).name}"
        config = write_config(tmp_path / "ft.yaml", ring_shards, model={"name": "alternet_tiny", "init_from": ref},
                              train={"max_steps": 1}, optim={"name": "sgd", "lr": 1e-12, "momentum": 0.0},
                              checkpoint={"every_steps": 1})
        proc = lenstrain("train", config, "--run-dir", run, check=True)
        assert "initial weights from" in proc.stdout and "optimizer state starts fresh" in proc.stdout
        report = json.loads((run / "init.json").read_text())
        assert report["counts"]["loaded"] > 0 and report["counts"]["missing"] == 0
        assert report["counts"]["unexpected"] == 0 and report["counts"]["mismatched"] == 0
        src, got = _weights_at(source, step), final_weights(run)
        for key, value in src.items():  # one SGD step of lr 1e-12 leaves the loaded weights as they were
            if value.is_floating_point() and "running_" not in key:  # (the forward moves BatchNorm's statistics)
                assert torch.allclose(got[key], value, atol=1e-9), key
        meta = json.loads(next((run / "checkpoints").glob("step-*/meta.json")).read_text())
        assert meta["train_state"]["step"] == 1  # its own steps start at 0: a new run, not a resume
    best = json.loads((tmp_path / "ft-6-src" / "init.json").read_text())["source"]
    assert "its newest checkpoint (step 6)" in best


def test_init_skip_and_strict(tmp_path, ring_shards, source):
    # Another output width (the two-class target, bce: one output... ce: two): the head does not fit.
    base = {"data": {"target": "cls"}, "train": {"max_steps": 1, "loss": "ce"}, "checkpoint": {"best_metric": "val/auc"}}
    strict = write_config(tmp_path / "strict.yaml", ring_shards, model={"name": "alternet_tiny",
                                                                       "init_from": f"{source}@best"}, **base)
    proc = lenstrain("train", strict, "--run-dir", tmp_path / "strict")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.init_from: the initial weights do not fit the model: of another shape: head." in proc.stderr
    assert "List the parameters to re-initialise in model.init_skip" in proc.stderr
    assert not (tmp_path / "strict").exists()  # refused before any work

    skip = write_config(tmp_path / "skip.yaml", ring_shards,
                        model={"name": "alternet_tiny", "init_from": f"{source}@best", "init_skip": ["head.*"]}, **base)
    proc = lenstrain("train", skip, "--run-dir", tmp_path / "skip", check=True)
    report = json.loads((tmp_path / "skip" / "init.json").read_text())
    assert report["skipped"] == ["head.3.weight", "head.3.bias"] and report["counts"]["mismatched"] == 0
    assert "2 re-initialised (model.init_skip)" in proc.stdout

    loose = write_config(tmp_path / "loose.yaml", ring_shards,
                         model={"name": "alternet_tiny", "init_from": f"{source}@best", "init_strict": False}, **base)
    lenstrain("train", loose, "--run-dir", tmp_path / "loose", check=True)
    report = json.loads((tmp_path / "loose" / "init.json").read_text())
    assert report["counts"]["mismatched"] == 2 and any(m.startswith("head.3.weight: source (1, ") for m in
                                                       report["mismatched"])

    for bad, message in ((f"{source}@99", "no such checkpoint; complete checkpoints at steps: 3, 6"),
                         (str(tmp_path / "nowhere"), "no such run directory or weights file")):
        config = write_config(tmp_path / "bad.yaml", ring_shards, model={"name": "alternet_tiny", "init_from": bad})
        proc = lenstrain("train", config, "--run-dir", tmp_path / "bad")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_resumed_fine_tuning_run_reads_its_own_checkpoint(tmp_path, ring_shards, source):
    config = write_config(tmp_path / "ft.yaml", ring_shards, model={"name": "alternet_tiny", "init_from": str(source)},
                          train={"max_steps": 3, "epochs": 40}, checkpoint={"every_steps": 1, "keep": 3})
    lenstrain("train", config, "--run-dir", tmp_path / "ft", check=True)
    # As if killed after step 2: the last checkpoint gone, the run's config unchanged (its keys are fixed).
    shutil.rmtree(max((tmp_path / "ft" / "checkpoints").glob("step-*")))
    proc = lenstrain("train", config, "--run-dir", tmp_path / "ft", check=True)
    assert "resumed from" in proc.stdout and "initial weights from" not in proc.stdout
    assert "note: train.max_steps (3) is set, so train.epochs (40) is not used" in proc.stdout


def test_the_launcher_stores_init_from_absolute_and_checks_it(tmp_path, ring_shards, source, monkeypatch, capsys,
                                                               launcher_job):
    from launcher.__main__ import main

    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    monkeypatch.chdir(source.parent)
    code = main(["submit", str(launcher_job()), "--set", f"model.init_from={source.name}@best", "--dry-run",
                 "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"init_from: {source}@best" in out.out and "problem" not in out.out
    code = main(["submit", str(launcher_job()), "--set", f"model.init_from={source}", "--set", "model.name=resnet18",
                 "--runs-dir", str(tmp_path / "runs"), "--local"])
    assert code == 2 and "model.init_from: the initial weights do not fit the model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ predict --images


def test_predict_images_matches_predict_shards(tmp_path, ring_shards, source):
    from shards.reader import ShardReader

    reader = ShardReader(ring_shards, "test")
    images = np.stack([reader.read(i)[0] for i in range(len(reader))]).astype(np.float32)  # (N, 1, 32, 32)
    folder = tmp_path / "imgs"
    (folder / "more").mkdir(parents=True)
    np.save(folder / "stack.npy", images[:10])
    for i in range(10, len(images) - 1):
        np.save(folder / "more" / f"one-{i:02d}.npy", images[i][0])  # (H, W)
    from astropy.io import fits

    fits.PrimaryHDU(images[-1][0]).writeto(folder / "more" / "z.fits")

    lenstrain("predict", source, "--shards", ring_shards, "--split", "test", "--out", tmp_path / "shards.csv", check=True)
    proc = lenstrain("predict", source, "--images", folder, "--out", tmp_path / "files.csv", "--batch-size", "4",
                     check=True)
    assert f"for {len(images)} image(s) in {len(images) - 9} file(s)" in proc.stdout
    by_shards = [float(r["y"]) for r in csv.DictReader((tmp_path / "shards.csv").open())]
    rows = list(csv.DictReader((tmp_path / "files.csv").open()))
    assert [r["file"] for r in rows[:2]] == ["more/one-10.npy", "more/one-11.npy"]  # sorted paths
    order = sorted(range(len(images)), key=lambda i: ("stack.npy", i) if i < 10 else
                   ((f"more/one-{i:02d}.npy" if i < len(images) - 1 else "more/z.fits"), 0))
    by_files = {(r["file"], int(r["index"])): float(r["y"]) for r in rows}
    for i in order:
        key = ("stack.npy", i) if i < 10 else ((f"more/one-{i:02d}.npy" if i < len(images) - 1 else "more/z.fits"), 0)
        assert by_files[key] == pytest.approx(by_shards[i], rel=1e-5, abs=1e-6), key

    # Pickles, wrong channels or sizes: one error naming the file, exit 2, nothing written.
    np.save(tmp_path / "pickled.npy", np.array([images[0], 1.0], dtype=object), allow_pickle=True)
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 32, 32), np.float32))  # ((3, 32, 32) is 3 one-channel images)
    np.save(tmp_path / "big.npy", np.zeros((64, 64), np.float32))
    for name, message in (("pickled.npy", "a pickled (object) array"),
                          ("rgb.npy", "images with 3 channel(s) (shape (2, 3, 32, 32)); the model was trained on 1"),
                          ("big.npy", "images of 64x64 pixels; the model was trained on 32x32")):
        proc = lenstrain("predict", source, "--images", tmp_path / name, "--out", tmp_path / "x.csv")
        assert proc.returncode == 2 and f"{tmp_path / name}: {message}" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.csv").exists()
    proc = lenstrain("predict", source, "--images", folder, "--out", tmp_path / "s3.csv", "--step", "3", check=True)
    assert "step 3, as asked" in proc.stdout
