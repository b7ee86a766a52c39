"""TensorBoard's hyperparameter record of a run lands at the run's final step, with its final metrics."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tests.factories import write_config
from tests.train_helpers import lenstrain


def hparams_plugin_steps(tb_dir: Path) -> dict[str, list[int]]:
    """The steps of the hparams plugin's own records (experiment, session start, session end), by tag."""
    steps: dict[str, list[int]] = {}
    for path in sorted(tb_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_hparams_and_their_metrics_are_written_at_the_final_step(tmp_path, ring_shards):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 5, "val_every_steps": 5})
    run = tmp_path / "run"
    lenstrain("train", config, "--run-dir", run, check=True)

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    hparam_tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("hparam/")]
    assert "hparam/val/r2" in hparam_tags, events.Tags()["scalars"]
    for tag in hparam_tags:
        assert [e.step for e in events.Scalars(tag)] == [5], tag
    assert events.Scalars("hparam/val/r2")[0].value == events.Scalars("val/r2")[-1].value

    # One name per parameter, the config's dotted key, as a sweep's trial parameters are named.
    from tests.test_sweep_local import hparams_of

    names = set(hparams_of(run / "tb"))
    assert {"model.name", "optim.lr", "optim.name", "train.precision"} <= names, names
    assert not names & {"lr", "optim", "model", "precision", "batch"}, names

    assert hparams_plugin_steps(run / "tb") == {
        "_hparams_/experiment": [5], "_hparams_/session_start_info": [5], "_hparams_/session_end_info": [5]}
