"""Checkpoints under faults: the one rule for the best checkpoint, hostile files, full disks."""

from __future__ import annotations

import json
import math

from lenstrain.checkpoint import COMPLETE, best_checkpoint, step_dir_name


def fake_checkpoint(root, step: int, metrics: dict, complete: bool = True):
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}))
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "files": {}}))
    return path


def test_best_checkpoint_newer_wins_ties_and_never_picks_non_finite(tmp_path):
    fake_checkpoint(tmp_path, 1, {"val/loss": 0.5})
    tied_newer = fake_checkpoint(tmp_path, 2, {"val/loss": 0.5})
    fake_checkpoint(tmp_path, 3, {"val/loss": math.nan})
    fake_checkpoint(tmp_path, 4, {"val/loss": -math.inf})
    fake_checkpoint(tmp_path, 5, {"val/loss": 0.1}, complete=False)
    fake_checkpoint(tmp_path, 6, {"val/r2": 0.9})
    assert best_checkpoint(tmp_path, "val/loss", "min") == tied_newer
    assert best_checkpoint(tmp_path, "val/r2", "max") == tmp_path / step_dir_name(6)
    assert best_checkpoint(tmp_path, "val/loss", "max") == tied_newer
    assert best_checkpoint(tmp_path, "val/nothing", "min") is None
    assert best_checkpoint(tmp_path, None, "min") is None
