"""The ``python -m shards`` command line: help, a real import -> inspect -> verify round trip, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shards.cli import commands, main
from shards.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LENSTRAIN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "shards", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ring_image(rng, size: int, radius: float) -> np.ndarray:
    """A faint Einstein-ring-like arc around a bright core, plus noise."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y)
    arc = 0.05 * np.exp(-((r - radius) ** 2) / 4) * (1 + np.cos(np.arctan2(y, x) - rng.uniform(0, 6.3)))
    core = np.exp(-(r**2) / 8)
    return (core + arc + rng.normal(0, 0.002, (size, size))).astype(np.float32)


def make_tree(root: Path, per_class: int = 8, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for c in ("axion", "cdm", "no_sub"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = ring_image(rng, size, radius=size / 4)
            if c == "axion":
                np.save(root / c / f"{i}.npy", np.array([img, 10 ** rng.uniform(-24, -22)], dtype=object),
                        allow_pickle=True)
            else:
                np.save(root / c / f"{i}.npy", img)
    return root


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- help

def _commands() -> list[list[str]]:
    cmds = [[], ["import"], ["import", "deeplense"], ["import", "arrays"], ["verify"], ["inspect"]]
    if "simulate" in [c.name for c in commands()]:
        cmds.append(["simulate"])
    return cmds


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "shards")
def test_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: shards {' '.join(command)}".rstrip())
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- round trip

def test_import_inspect_verify_round_trip(tmp_path, capsys):
    src = make_tree(tmp_path / "Model_I")
    out = tmp_path / "shards" / "model1"
    assert main(["import", "deeplense", str(src), "--out", str(out), "--shard-size", "8", "--workers", "2",
                 "--val", "0.25", "--test", "0.125"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: train 15, val 6, test 3 samples" in text
    assert "class (classification), axion_mass (regression)" in text

    png = tmp_path / "grid.png"
    assert main(["inspect", str(out), "--grid", str(png), "--per-class", "3"]) == 0
    text = capsys.readouterr().out
    for word in ("Samples per split", "axion", "cdm", "no_sub", "axion_mass", "Image pixels", f"wrote {png}"):
        assert word in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    assert main(["verify", str(out)]) == 0
    assert "OK: 4 shards, 24 samples match the manifest" in capsys.readouterr().out

    shard = load_manifest(out).splits["train"].shards[1]
    member = shard.members[2]
    with open(out / shard.name, "r+b") as fh:
        fh.seek(member.image_offset + 200)
        byte = fh.read(1)
        fh.seek(member.image_offset + 200)
        fh.write(bytes([byte[0] ^ 0x10]))
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"{shard.name}: member {member.key}.image.npy: CRC-32 differs" in text
    assert "FAILED" in text


def test_import_arrays_with_csv(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "X.npy", rng.random((30, 3, 16, 16)).astype(np.float32))
    rows = ["einstein_radius,kind"] + [f"{rng.uniform(0.5, 2)},{'ab'[i % 2]}" for i in range(30)]
    (tmp_path / "y.csv").write_text("\n".join(rows) + "\n")
    result = run_cli("import", "arrays", "--images", tmp_path / "X.npy", "--labels", tmp_path / "y.csv",
                     "--out", tmp_path / "o", "--target", "kind", "--dtype", "float16", "--workers", "1")
    assert result.returncode == 0, result.stderr
    m = load_manifest(tmp_path / "o")
    assert m.primary_target == "kind" and m.image.dtype == "float16" and m.image.shape == (3, 16, 16)
    assert run_cli("verify", tmp_path / "o").returncode == 0


# --------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src") / "M", per_class=4, size=16)


def test_existing_out_exits_2_and_changes_nothing_then_overwrite_replaces(tree, tmp_path):
    out = tmp_path / "o"
    assert run_cli("import", "deeplense", tree, "--out", out, "--workers", "1").returncode == 0
    before = snapshot(out)
    result = run_cli("import", "deeplense", tree, "--out", out, "--seed", "5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {out} already exists; choose another --out or pass --overwrite"]
    assert snapshot(out) == before
    result = run_cli("import", "deeplense", tree, "--out", out, "--seed", "5", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert snapshot(out) != before
    assert load_manifest(out).source["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_corrupt_npy_is_named_and_skip_bad_counts_it(tmp_path):
    src = make_tree(tmp_path / "M", per_class=4, size=16)
    bad = src / "cdm" / "2.npy"
    bad.write_bytes(bad.read_bytes()[:60])
    result = run_cli("import", "deeplense", src, "--out", tmp_path / "o")
    assert result.returncode == 1
    assert str(bad) in result.stderr and "cannot read .npy" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
    result = run_cli("import", "deeplense", src, "--out", tmp_path / "o", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad samples" in result.stderr and str(bad) in result.stderr
    assert load_manifest(tmp_path / "o").source["skipped"] == 1


def test_misshaped_image_is_named(tmp_path):
    src = make_tree(tmp_path / "M", per_class=4, size=16)
    np.save(src / "no_sub" / "1.npy", np.zeros((16, 16, 5), np.float32))
    result = run_cli("import", "deeplense", src, "--out", tmp_path / "o")
    assert result.returncode == 1
    assert f"{src / 'no_sub' / '1.npy'}: image has shape (16, 16, 5)" in result.stderr
    assert "Traceback" not in result.stderr


def exit_status(argv: list[str]) -> int:
    """``main``'s exit status, whether argparse exits (a bad value) or the command returns (a bad combination)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize(("args", "message"), [
    (["--shard-size", "0"], "--shard-size: must be positive, got 0"),
    (["--workers", "-2"], "--workers: must be positive, got -2"),
    (["--seed", "-1"], "--seed: must be non-negative, got -1"),
    (["--val", "1.5"], "--val: must be in [0, 1), got 1.5"),
    (["--val", "0.6", "--test", "0.5"], "error: --val (0.6) plus --test (0.5) must be below 1"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
])
def test_bad_arguments_exit_2(tree, tmp_path, args, message, capsys):
    assert exit_status(["import", "deeplense", str(tree), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_paths_and_non_shard_sets(tmp_path, capsys):
    assert main(["import", "deeplense", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "error: " + str(tmp_path / "nope") + ": no such directory" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    not_a_set = (f"error: {tmp_path / 'plain'} is not a shard set (no manifest.json); make one with "
                 "`python -m shards simulate ...` or `python -m shards import ...`\n")
    # One rule for a DIR that names no shard set, missing or not: a wrong argument, exit 2.
    assert main(["verify", str(tmp_path / "plain")]) == 2
    assert capsys.readouterr().err == not_a_set
    assert main(["inspect", str(tmp_path / "plain")]) == 2
    assert capsys.readouterr().err == not_a_set
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_sigterm_mid_pack_leaves_no_output_and_no_staging(tmp_path):
    src = tmp_path / "big"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(600):
            np.save(src / c / f"{i}.npy", rng.random((32, 32), dtype=np.float32))
    out = tmp_path / "out" / "set"
    env = {**os.environ, "LENSTRAIN_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "shards", "import", "deeplense", str(src), "--out", str(out),
                             "--shard-size", "20", "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(out.parent.glob(".set.partial-*/*.tar")):  # mid-pack: the first shard is being written
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.skip("packing finished before the signal could be sent")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_write_grid_spans_a_regression_target(tmp_path):
    from shards.grid import asinh_stretch, write_grid
    from shards.options import PackOptions
    from shards.sources.arrays import pack_arrays

    rng = np.random.default_rng(3)
    images = np.stack([ring_image(rng, 32, 8)[None] for _ in range(40)])
    pack_arrays(images, {"einstein_radius": rng.uniform(0.5, 2, 40)}, tmp_path / "r", PackOptions(val=0, test=0))
    png = write_grid(tmp_path / "r", tmp_path / "sub" / "r.png", per_class=3)
    assert png.read_bytes()[:4] == b"\x89PNG"
    shown = asinh_stretch(images[0])
    assert shown.shape == (32, 32) and shown.min() >= 0 and shown.max() <= 1
    assert asinh_stretch(np.zeros((3, 8, 8))).shape == (8, 8, 3)
