"""``data.stream``: training on fresh simulations. Each sample is a pure function of (stream seed, index) and is
the sample ``shards simulate`` would store; no index comes twice across epochs and ranks; a resume (a signal or
SIGKILL, one process or two, two to one) renders the same batches; bad streams exit 2 naming the key.

Everything runs on 16x16 images of the lens-drawn DeepLense Model II rung, so rendering costs little."""

from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lenstrain.checkpointing.checkpoint import latest_complete, list_checkpoints, read_meta
from lenstrain.checkpointing.rundir import RunDir
from lenstrain.cli import main as lenstrain_main
from lenstrain.config.schema import load_config
from lenstrain.data.loader import Cursor, SequentialOrder, TrainStream
from lenstrain.data.stream import StreamBatchBuilder, manifest_problems, stream_plan
from lenstrain.run.build import build_builder, build_stream_builder, build_task
from lenstrain.run.preemption import EXIT_REQUEUE
from shards.reader import ShardReader
from tests.factories import assert_same_weights, final_weights, merged
from tests.train_helpers import lenstrain, signal_at_step, train_until_signalled

OPTIONS = {"lens": "drawn", "halo_mass": [11.2, 12.1], "size": 16}
SET_SEED = 1


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """30 images of the lens-drawn deeplense2 rung at 16x16 (6 train, 12 val, 12 test), simulation seed 1."""
    from shards.simulate import simulate

    out = tmp_path_factory.mktemp("stream") / "dl2-drawn"
    simulate("substructure", 30, out, preset="deeplense2", physics={"lens": "drawn", "halo_mass": (11.2, 12.1)},
             size=16, seed=SET_SEED,
             val=0.4, test=0.4, workers=1)
    return out


def stream_config(shards: Path, **sections) -> dict:
    """A small, exact training config on the stream: alternet_tiny, batch 4, 12 steps, epochs of 16 samples."""
    base = {
        "seed": 3,
        "data": {"shards": str(shards), "batch_size": 4, "workers": 0, "augment": {"device": "device"},
                 "stream": {"preset": "deeplense2", "task": "substructure", "seed": 11, "options": dict(OPTIONS),
                            "epoch_size": 16}},
        "model": {"name": "alternet_tiny"},
        "train": {"max_steps": 12, "precision": "fp32", "deterministic": True},
        "checkpoint": {"every_steps": 4, "keep": 2, "every_minutes": None},
        "log": {"every_steps": 1, "images": False},
    }
    return merged(base, **sections)


def with_stream(config: dict, **stream) -> dict:
    out = copy.deepcopy(config)
    out["data"]["stream"].update(stream)
    return out


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stream(cfg, *, rank=0, world=1, batch=None, cursor=None, workers=0, kind="thread"):
    task = build_task(cfg)
    builder, n = build_stream_builder(cfg, task)
    return TrainStream(builder, n=n, seed=cfg.seed, rank=rank, world=world, batch=batch or cfg.data.batch_size,
                       accum=1, workers=workers, prefetch=2, cursor=cursor, worker_kind=kind, order=SequentialOrder(n))


def take(s: TrainStream, steps: int) -> list[dict]:
    return [s.next_step()[0] for _ in range(steps)]


# ------------------------------------------------------------------------------------ what a sample is


def test_a_stream_sample_is_the_sample_shards_simulate_stores_prepared_as_the_set_prepares_its_own(eval_set):
    """With the shard set's own seed (which preflight refuses, to keep its test images out of training), the
    stream renders exactly the set's samples; normalised and scaled from its manifest, the batches are equal."""
    cfg = load_config(with_stream(stream_config(eval_set, data={"target": "halo_mass", "normalize": "global"}),
                                  seed=SET_SEED))
    task = build_task(cfg)
    shard_builder, _ = build_builder(cfg, task, "test", augment=False)
    reader = ShardReader(eval_set, "test", task.manifest)
    positions = [0, 5, 7]
    sample_index = [reader.labels(p)["index"] for p in positions]
    plan, problems = stream_plan(cfg.data.stream)
    assert not problems and "data.stream.seed" in dict(manifest_problems(cfg, plan, task.manifest))
    stats = task.manifest.image.stats
    stream_builder = StreamBatchBuilder(plan, task.target, dtype=task.manifest.image.dtype, seed=cfg.seed,
                                        normalize="global", mean=stats.mean, std=stats.std, rotate=True, flip=True)
    ours = stream_builder(np.array(sample_index), None)
    theirs = shard_builder(np.array(positions), None)
    assert torch.equal(ours["image"], theirs["image"])
    assert torch.equal(ours["target"], theirs["target"])  # halo_mass, standardised with the set's statistics
    assert task.target.scale != 1.0 and task.manifest.image.stats.std != 1.0
    again = stream_builder(np.array(sample_index[::-1]), None)  # another batch, another order: the same samples
    assert torch.equal(again["image"].flip(0), ours["image"])


def test_no_sample_comes_twice_across_epochs_and_ranks(eval_set):
    cfg = load_config(stream_config(eval_set))
    world, batch, epochs = 2, 3, 3
    ranks = [stream(cfg, rank=r, world=world, batch=batch) for r in range(world)]
    per_epoch = ranks[0].steps_per_epoch
    assert per_epoch == 16 // (world * batch) == 2  # a tail of 4 samples per epoch is dropped, as with shards
    seen = [[int(i) for b in take(s, epochs * per_epoch) for i in b["index"]] for s in ranks]
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == epochs * per_epoch * world * batch
    assert not set(seen[0]) & set(seen[1])
    assert max(everything) < epochs * 16 and all(ranks[r].cursor.epoch == epochs for r in range(world))
    labels = [int(i) % 3 for i in seen[0][:batch]]
    assert labels == [0, 1, 2]  # sample k is of class k mod 3: every batch is balanced


def test_a_resume_from_two_ranks_to_one_renders_the_same_global_batches(eval_set):
    """The global order of two ranks, stopped after 3 steps and continued by one rank (on worker processes, with
    the global batch kept), is the uninterrupted two-rank order: the same samples and the same images."""
    cfg = load_config(stream_config(eval_set, data={"augment": {"device": "cpu"}}))
    world, batch, steps = 2, 2, 7

    def global_batches(streams, n):
        per_rank = [take(s, n) for s in streams]
        return [(torch.cat([b["index"] for b in step]), torch.cat([b["image"] for b in step]))
                for step in zip(*per_rank, strict=True)]

    straight = global_batches([stream(cfg, rank=r, world=world, batch=batch) for r in range(world)], steps)
    before = [stream(cfg, rank=r, world=world, batch=batch) for r in range(world)]
    global_batches(before, 3)
    cursor = Cursor()
    cursor.load_state_dict(before[0].cursor.state_dict())
    after = stream(cfg, world=1, batch=world * batch, cursor=cursor, workers=2, kind="process")
    for (index, image), b in zip(straight[3:], take(after, steps - 3), strict=True):
        assert torch.equal(index, b["index"]) and torch.equal(image, b["image"])


# ------------------------------------------------------------------------------------ exact resume, end to end


@pytest.mark.slow  # four training processes
def test_signal_and_sigkill_resume_bit_identical_in_one_process(tmp_path, eval_set):
    config = write(tmp_path / "c.yaml", stream_config(eval_set, data={"workers": 1, "worker_kind": "process"}))
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, check=True)

    preempted = tmp_path / "preempted"
    code, out = train_until_signalled(config, preempted, at_step=5)
    assert code == EXIT_REQUEUE, out
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lenstrain", "train", config, "--run-dir", killed]
    code, out = signal_at_step(cmd, killed, at_step=6, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    steps = [s for s, _ in list_checkpoints(RunDir(killed).checkpoints)]
    assert steps and max(steps) < 12, steps
    for run in (preempted, killed):
        again = lenstrain("train", config, "--run-dir", run, check=True)
        assert "resumed from" in again.stdout
        assert_same_weights(final_weights(straight), final_weights(run))


@pytest.mark.multiprocess  # two ranks
def test_ddp_resume_is_bit_identical_and_two_ranks_resume_as_one(tmp_path, eval_set):
    config = write(tmp_path / "c.yaml", stream_config(eval_set))
    straight = tmp_path / "straight"
    lenstrain("train", config, "--run-dir", straight, "--nproc", 2, check=True)

    resumed = tmp_path / "resumed"
    code, out = train_until_signalled(config, resumed, at_step=3, nproc=2)
    assert code == EXIT_REQUEUE, out
    as_one = tmp_path / "as-one"
    import shutil

    shutil.copytree(resumed, as_one)
    lenstrain("train", config, "--run-dir", resumed, "--nproc", 2, check=True)
    assert_same_weights(final_weights(straight), final_weights(resumed))

    one = lenstrain("train", config, "--run-dir", as_one, check=True)
    assert "keeping the global batch of 8 with 8 samples per rank" in one.stdout, one.stdout
    end = read_meta(latest_complete(RunDir(as_one).checkpoints))["cursor"]
    assert end == read_meta(latest_complete(RunDir(straight).checkpoints))["cursor"]  # the same samples consumed


# ------------------------------------------------------------------------------------ bad streams


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"options": {**OPTIONS, "lens": "bent"}}, "data.stream.options.lens", "expected one of fixed, drawn, got 'bent'"),
    ({"options": {**OPTIONS, "source_mag": [24, 22]}}, "data.stream.options.source_mag", "expected LOW[,HIGH] in"),
    ({"options": {**OPTIONS, "warp": 3}}, "data.stream.options.warp", "unknown option; valid options: exposure"),
    ({"options": {**OPTIONS, "workers": 3}}, "data.stream.options.workers", "--workers describes a shard set"),
    ({"options": {**OPTIONS, "z_lens": 2.9}}, "data.stream.options.z_lens", "must lie above --z-lens"),
    ({"options": {**OPTIONS, "halo-mass": 12.0}}, "data.stream.options.halo-mass", "the same option as "
                                                                                   "data.stream.options.halo_mass"),
    ({"options": {**OPTIONS, "seed": 4}}, "data.stream.options.seed", "is data.stream.seed"),
    ({"preset": "euclid"}, "data.stream.preset", "'euclid', but the shard set was simulated with preset 'deeplense2'"),
    ({"preset": "deeplense9"}, "data.stream.preset", "invalid choice: 'deeplense9'"),
    ({"task": "halo_mass"}, "data.stream.task", "the stream has 'halo_mass', the shard set 'substructure'"),
    ({"options": {**OPTIONS, "lens": "fixed"}}, "data.stream.options.lens", "the stream draws 'fixed', the shard "
                                                                           "set was simulated with 'drawn'"),
    ({"options": {**OPTIONS, "size": 32}}, "data.stream.options.size", "renders images of (1, 32, 32), the shard "
                                                                       "set holds (1, 16, 16)"),
    ({"seed": SET_SEED}, "data.stream.seed", "1 is the seed the shard set was simulated with"),
    ({"epoch_size": -5}, "data.stream.epoch_size", "greater than or equal to 1"),
    ({"epoch_size": 2}, "data.stream.epoch_size", "exceeds the 2 samples of a stream epoch"),
    ({"auxiliary": "noise"}, "data.stream.auxiliary", "Input should be 'none' or 'smooth'"),
    ({"auxiliary": "smooth"}, "data.stream.auxiliary", "'smooth' needs a model that predicts it; model.name "
                                                       "'alternet_tiny' does not (models that do: smooth_residual_net)"),
])
def test_a_bad_stream_exits_2_naming_the_key(tmp_path, eval_set, capsys, change, key, message):
    config = write(tmp_path / "c.yaml", with_stream(stream_config(eval_set), **change))
    assert lenstrain_main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"  {key}: " in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_launcher_checks_the_stream_and_records_it_in_the_config(tmp_path, eval_set, capsys):
    from launcher.__main__ import main as launcher_main

    job = {"name": "stream-job", "resources": {"cluster": "local"}, **stream_config(eval_set)}
    runs = ["--runs-dir", str(tmp_path / "runs")]
    bad = write(tmp_path / "bad.yaml", with_stream(job, options={**OPTIONS, "lens": "bent"}))
    assert launcher_main(["submit", str(bad), *runs]) == 2
    assert "  data.stream.options.lens: expected one of fixed, drawn" in capsys.readouterr().err
    assert launcher_main(["submit", str(bad), "--dry-run", *runs]) == 0  # a dry run shows the problems
    assert "#   data.stream.options.lens: expected one of fixed, drawn" in capsys.readouterr().out
    good = write(tmp_path / "good.yaml", job)
    assert launcher_main(["submit", str(good), "--dry-run", *runs]) == 0
    out = capsys.readouterr().out
    assert "  stream:\n    preset: deeplense2" in out and "worker_kind: process" in out, out
    assert "problem" not in out and not (tmp_path / "runs").exists()


def test_a_stream_works_with_process_workers_by_default_and_threads_when_asked(eval_set):
    assert load_config(stream_config(eval_set)).data.worker_kind == "process"
    asked = stream_config(eval_set, data={"worker_kind": "thread"})
    assert load_config(asked).data.worker_kind == "thread"
    assert load_config(merged(stream_config(eval_set), data={"stream": None})).data.worker_kind == "thread"


def test_the_shipped_stream_job_reads_its_own_stream(eval_set):
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "stream_substructure.yaml",
                      [f"data.shards={eval_set}"])
    assert cfg.data.stream.options == {"lens": "drawn", "halo_mass": [11.2, 12.1]}
    assert cfg.data.stream.epoch_size * 5 == 300_000 and cfg.data.worker_kind == "process"


# ------------------------------------------------------------------------------------ the smooth lens, as a target


def smooth_config(shards: Path, **sections) -> dict:
    """The small stream config with the smooth lens as an auxiliary target of smooth_residual_net."""
    config = with_stream(stream_config(shards, **sections), auxiliary="smooth")
    config["model"] = {"name": "smooth_residual_net", "kwargs": {"width": 4}}
    return config


def test_the_smooth_target_is_the_smooth_lens_rendered_alone_and_turned_with_its_image(eval_set):
    from shards.simulate.physics import draw_params, render, render_clean, smooth_twin

    cfg = load_config(smooth_config(eval_set))
    plan, problems = stream_plan(cfg.data.stream)
    assert not problems
    task = build_task(cfg)

    def builder(auxiliary, normalize="none", turn=False):
        return StreamBatchBuilder(plan, task.target, dtype="float32", seed=cfg.seed, normalize=normalize, mean=0.0,
                                  std=1.0, rotate=turn, flip=turn, auxiliary=auxiliary)

    indices = np.array([0, 1, 2])  # no_sub, cdm, vortex
    batch = builder("smooth")(indices, 0)
    assert torch.equal(batch["image"], builder("none")(indices, 0)["image"])  # the images are as without it
    for k, index in enumerate(indices.tolist()):
        params = draw_params(plan.config, index)
        smooth = render_clean(plan.config, smooth_twin(params))
        if plan.config.physics.scaling == "max":
            smooth = smooth / render(plan.config, params).max()
        assert torch.allclose(batch["smooth"][k, 0], torch.from_numpy(smooth).float(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(batch["smooth"], batch["image"])  # noise and substructure are gone from it

    turned, plain = builder("smooth", "per_image_max", turn=True), builder("none", "per_image_max", turn=True)
    ours = turned(indices, 1)
    assert torch.equal(ours["image"], plain(indices, 1)["image"])
    draws = turned.augment.params(indices, 1)
    raw_image = turned.augment.apply(batch["image"].clone(), draws)
    raw_smooth = turned.augment.apply(batch["smooth"].clone(), draws)
    peak = raw_image.amax(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(ours["smooth"], raw_smooth / peak, atol=1e-6)  # the image's turn and its scale


@pytest.mark.slow  # 150 training steps
def test_smooth_residual_net_learns_the_smooth_lens_from_the_stream(eval_set):
    """Trained on the stream's batches (cross-entropy plus the smooth MSE), the encoder-decoder's prediction of the
    smooth lens of new samples gets closer than the image itself is, where it starts. (At 16x16 pixels the
    denoising is slow: 150 steps take off about a quarter of the error.)"""
    from lenstrain.models import create_model
    from lenstrain.optimization.losses import auxiliary_loss

    torch.manual_seed(0)
    cfg = load_config(smooth_config(eval_set, data={"batch_size": 16}))
    source = stream(cfg)
    model = create_model("smooth_residual_net", in_channels=1, num_outputs=3, image_size=16, width=8)
    held_out = take(stream(load_config(with_stream(smooth_config(eval_set), seed=99))), 2)

    def smooth_error() -> float:
        model.eval()
        errors = []
        with torch.no_grad():
            for b in held_out:
                model(b["image"])  # the forward leaves its smooth prediction on the model
                errors.append(float(auxiliary_loss(model, b, torch.device("cpu"))))
        return sum(errors) / len(errors)

    before = smooth_error()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for batch in take(source, 150):
        loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["target"])
        loss = loss + auxiliary_loss(model, batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = smooth_error()
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow  # three training processes
def test_a_run_with_the_smooth_target_resumes_bit_identical_and_validates_without_it(tmp_path, eval_set):
    config = write(tmp_path / "c.yaml", smooth_config(eval_set, train={"max_steps": 8, "val_every_steps": 4}))
    straight = tmp_path / "straight"
    out = lenstrain("train", config, "--run-dir", straight, check=True).stdout
    assert "val/accuracy" in out  # validation batches (from shards) carry no smooth image: the outputs are scored
    preempted = tmp_path / "preempted"
    code, out = train_until_signalled(config, preempted, at_step=5)
    assert code == EXIT_REQUEUE, out
    again = lenstrain("train", config, "--run-dir", preempted, check=True)
    assert "resumed from" in again.stdout
    assert_same_weights(final_weights(straight), final_weights(preempted))
    weights = final_weights(straight)
    assert any(k.startswith("smoother.") for k in weights) and any(k.startswith("classifier.") for k in weights)


def test_the_shipped_smooth_job_trains_the_physics_informed_model(eval_set):
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "stream_substructure_smooth.yaml",
                      [f"data.shards={eval_set}"])
    assert cfg.data.stream.auxiliary == "smooth" and cfg.model.name == "smooth_residual_net"
    assert cfg.train.auxiliary_weight == 1.0
