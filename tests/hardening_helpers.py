"""What the hardening and fuzz tests share: the three CLIs run in this process, the one-line error check, the
structure check of an sbatch script, and a small run directory with checkpoints made without training."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lenstrain.checkpointing.stateio import COMPLETE, save_state_file, sha256_file
from lenstrain.models import create_model
from tests.factories import config_dict


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def run_main(main, *argv) -> Result:
    """A CLI's ``main`` run here, its output captured; an exception escaping it fails the test as a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(int(code), out.getvalue(), err.getvalue())


def lenstrain_cli(*argv) -> Result:
    from lenstrain.cli import main

    return run_main(main, *argv)


def launcher_cli(*argv) -> Result:
    from launcher.__main__ import main

    return run_main(main, *argv)


def shards_cli(*argv) -> Result:
    from shards.cli import main

    return run_main(main, *argv)


def assert_refused(result: Result, code: int, *names: str) -> str:
    """Exit ``code``, no traceback, and one ``error:`` line that names each of ``names``; returns that line."""
    assert result.code == code, (result.code, result.text)
    assert "Traceback" not in result.text, result.text
    lines = result.error_lines()
    assert len(lines) == 1, result.err
    for name in names:
        assert str(name) in result.err, (name, result.err)
    return lines[0]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (to show that nothing was overwritten)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ the sbatch script


def sbatch_part(out: str) -> str:
    start = out.index("#!/bin/bash")
    end = out.index("# dry run: nothing submitted")
    return out[start:end].rstrip() + "\n"


def script_structure_problems(script: str) -> list[str]:
    """Why ``script`` is not a safe batch script: ``bash -n`` fails, or an ``#SBATCH`` line comes after the first
    command (sbatch stops reading its options there), or an option line carries more than one option."""
    problems = []
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        problems.append(f"bash -n: {check.stderr.strip()}")
    first_command = None
    for number, line in enumerate(script.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            if first_command is not None:
                problems.append(f"line {number}: {line!r} comes after the first command (line {first_command})")
        elif stripped and not stripped.startswith("#") and first_command is None:
            first_command = number
    if first_command is None:
        problems.append("the script runs no command")
    return problems


# ------------------------------------------------------------------------------------ a run made by hand


def entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_marker(step_dir: Path, payload) -> None:
    (step_dir / COMPLETE).write_text(payload if isinstance(payload, str) else json.dumps(payload))


def seal(step_dir: Path) -> None:
    """Write the ``COMPLETE`` marker as a run would: every other file's size and sha256."""
    files = {str(p.relative_to(step_dir)): entry(p) for p in sorted(step_dir.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    step = int(step_dir.name.removeprefix("step-"))
    write_marker(step_dir, {"step": step, "files": files})


def make_run(run_dir: Path, shards: Path, steps: tuple[int, ...] = (2, 4), **sections) -> Path:
    """A run directory of alternet_tiny on ``shards`` with a checkpoint (``model.pt``, ``meta.json``, ``COMPLETE``)
    at each of ``steps``, each with its own weights, made without training."""
    config = config_dict(shards, **sections)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for step in steps:
        torch.manual_seed(step)
        model = create_model("alternet_tiny", in_channels=1, num_outputs=1, image_size=32)
        step_dir = run_dir / "checkpoints" / f"step-{step:08d}"
        step_dir.mkdir(parents=True)
        save_state_file(model.state_dict(), step_dir / "model.pt")
        batch = config["data"]["batch_size"]
        meta = {"step": step, "metrics": {"val/loss": 1.0 / step},
                "cursor": {"epoch": 0, "offset": step * batch, "global_batch": batch, "samples_seen": step * batch,
                           "version": 1},
                "train_state": {"step": step}}
        (step_dir / "meta.json").write_text(json.dumps(meta))
        seal(step_dir)
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
