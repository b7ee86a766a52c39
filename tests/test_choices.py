"""The config's choices come from the builders' tables; metric directions come from the METRICS table;
model keywords are checked against the family's config."""

from __future__ import annotations

import math

import pytest

from lenstrain.cli import main
from lenstrain.config.schema import ConfigError, load_config
from lenstrain.data.normalize import NORMALIZERS
from lenstrain.evaluation.metrics import METRICS, better, mode_for
from lenstrain.models import create_model, list_models
from lenstrain.models.registry import ModelOptionError, model_options
from lenstrain.optimization.losses import LOSSES
from lenstrain.optimization.optimizers import OPTIMIZERS, SCHEDULES
from tests.factories import config_dict, write_config


def rejection(shards, **sections) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(config_dict(shards, **sections))
    return str(caught.value)


def choices(names) -> str:
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


@pytest.mark.parametrize(("section", "key", "table", "extra"), [
    ("optim", "name", OPTIMIZERS, ()),
    ("schedule", "name", SCHEDULES, ()),
    ("train", "loss", LOSSES, ("auto",)),
    ("data", "normalize", NORMALIZERS, ()),
])
def test_each_choice_of_the_config_is_a_table_entry(ring_shards, section, key, table, extra):
    message = rejection(ring_shards, **{section: {key: "nonesuch"}})
    assert f"{section}.{key}: Input should be {choices([*extra, *table])}" in message
    for name in table:  # and every entry validates
        assert getattr(getattr(load_config(config_dict(ring_shards, **{section: {key: name}})), section), key) == name


@pytest.mark.parametrize(("metric", "mode"), [
    ("val/loss", "min"), ("val/mse", "min"), ("val/mae", "min"),
    ("val/r2", "max"), ("val/accuracy", "max"), ("val/auc", "max"), ("test/auc", "max"),
])
def test_modes_follow_the_metric_when_left_out(ring_shards, metric, mode):
    cfg = load_config(config_dict(ring_shards, checkpoint={"best_metric": metric},
                                  schedule={"name": "plateau", "metric": metric},
                                  train={"early_stopping": {"metric": metric}}))
    assert cfg.checkpoint.best_mode == cfg.schedule.mode == cfg.train.early_stopping.mode == mode
    assert mode_for(metric) == ("max" if METRICS[metric.split("/")[-1]].higher_is_better else "min")


def test_an_explicit_mode_that_agrees_is_kept(ring_shards):
    cfg = load_config(config_dict(ring_shards, checkpoint={"best_metric": "val/r2", "best_mode": "max"}))
    assert cfg.checkpoint.best_mode == "max"


@pytest.mark.parametrize(("sections", "expected"), [
    ({"checkpoint": {"best_metric": "val/r2", "best_mode": "min"}},
     "checkpoint.best_mode: 'min' contradicts checkpoint.best_metric 'val/r2' (higher is better); "
     "use max or leave it out"),
    ({"train": {"early_stopping": {"metric": "val/loss", "mode": "max"}}},
     "train.early_stopping.mode: 'max' contradicts train.early_stopping.metric 'val/loss' (lower is better); "
     "use min or leave it out"),
    ({"schedule": {"name": "plateau", "metric": "val/mae", "mode": "max"}},
     "schedule.mode: 'max' contradicts schedule.metric 'val/mae' (lower is better); use min or leave it out"),
])
def test_a_mode_that_contradicts_its_metric_exits_2_naming_both_keys(tmp_path, ring_shards, sections, expected,
                                                                    capsys):
    config = write_config(tmp_path / "c.yaml", ring_shards, **sections)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_better_one_rule_for_ties_and_non_finite_values():
    assert better(1.0, None, "min") and better(1.0, math.nan, "min") and better(1.0, math.inf, "max")
    assert not better(math.nan, None, "min") and not better(math.inf, 2.0, "min") and not better(None, 1.0, "max")
    assert not better(1.0, 1.0, "min") and not better(1.0, 1.0, "max")  # a tie is no improvement
    assert better(0.5, 1.0, "min") and not better(0.5, 1.0, "max") and better(2.0, 1.0, "max")
    assert not better(0.95, 1.0, "min", min_delta=0.1) and better(0.85, 1.0, "min", min_delta=0.1)


def test_create_model_rejects_an_unknown_keyword_listing_the_valid_ones():
    with pytest.raises(ModelOptionError, match=r"^resnet18 does not take keyword 'foo'; valid: .*\bnorm\b.*"
                                               r"\bdrop_rate\b"):
        create_model("resnet18", foo=1)
    assert create_model("alternet_tiny", norm="gn", drop_rate=0.1) is not None  # known keywords still build


def test_every_model_declares_its_keywords():
    """The keyword check covers every model: each family defines one config whose fields it takes."""
    assert [name for name in list_models() if not model_options(name)] == []
