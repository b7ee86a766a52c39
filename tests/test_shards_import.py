"""Importers: DeepLense class folders and array data sets, from real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import load_manifest
from shards.options import PackOptions
from shards.pack import BadSample
from shards.reader import ShardReader
from shards.sources.arrays import load_labels, pack_arrays
from shards.sources.common import SourceError
from shards.sources.deeplense import import_deeplense
from shards.sources.npyfile import read_npy

CLASSES = ("axion", "cdm", "no_sub")
REPO = Path(__file__).resolve().parents[1]


def make_deeplense(root: Path, *, size: int = 64, channels: int = 1, layout: str = "hw", per_class: int = 12,
                   valued: tuple[str, ...] = ("axion",), classes=CLASSES, seed: int = 0) -> dict[str, tuple]:
    """A DeepLense-style tree; returns {relative file: (image as (C,H,W) float32, value or None)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            chw = rng.random((channels, size, size)).astype(np.float32)
            if layout == "hw":
                assert channels == 1
                stored = chw[0]
            elif layout == "chw":
                stored = chw
            else:
                stored = np.moveaxis(chw, 0, -1).copy()
            rel = f"{c}/{c}_sim_{i:04d}.npy"
            value = None
            if c in valued:
                value = float(10 ** rng.uniform(-24, -22))
                np.save(root / rel, np.array([stored, value], dtype=object), allow_pickle=True)
            else:
                np.save(root / rel, stored)
            truth[rel] = (chw, value)
    return truth


def read_all(directory: Path) -> list[tuple[np.ndarray, dict]]:
    out = []
    for split in load_manifest(directory).splits:
        reader = ShardReader(directory, split)
        out.extend(reader.read(i) for i in range(len(reader)))
        reader.close()
    return out


# --------------------------------------------------------------------------- deeplense

@pytest.mark.parametrize(("size", "channels", "layout"), [
    (64, 1, "hw"), (150, 1, "hw"), (64, 3, "chw"), (64, 3, "hwc"), (150, 3, "hwc"), (64, 1, "chw"),
])
def test_deeplense_import_shapes_layouts_and_object_arrays(tmp_path, size, channels, layout):
    truth = make_deeplense(tmp_path / "Model", size=size, channels=channels, layout=layout, per_class=10)
    result = import_deeplense(tmp_path / "Model", tmp_path / "out", PackOptions(shard_size=8))
    m = result.manifest
    assert m.image.shape == (channels, size, size)
    assert m.primary_target == "class"
    assert m.targets["class"].kind == "classification" and m.targets["class"].classes == list(CLASSES)
    assert m.targets["axion_mass"].kind == "regression"
    assert m.source["kind"] == "deeplense" and m.source["value_classes"] == ["axion"]
    samples = read_all(tmp_path / "out")
    assert len(samples) == len(truth) == 30
    for image, labels in samples:
        chw, value = truth[labels["file"]]
        assert image.tobytes() == chw.tobytes()
        assert labels["class_name"] == labels["file"].split("/")[0]
        assert CLASSES[labels["class"]] == labels["class_name"]
        assert labels["axion_mass"] == value
    masses = [v for _, v in truth.values() if v is not None]
    assert m.targets["axion_mass"].stats.count < len(masses)  # train only
    assert m.targets["axion_mass"].stats.min >= min(masses)


def test_deeplense_plain_arrays_have_no_value_target(tmp_path):
    make_deeplense(tmp_path / "M", valued=(), per_class=5)
    m = import_deeplense(tmp_path / "M", tmp_path / "out").manifest
    assert list(m.targets) == ["class"]
    assert "axion_mass" not in read_all(tmp_path / "out")[0][1]


def test_deeplense_values_in_several_classes_are_label_value(tmp_path):
    make_deeplense(tmp_path / "M", valued=CLASSES, per_class=5)
    m = import_deeplense(tmp_path / "M", tmp_path / "out").manifest
    assert m.targets["label_value"].kind == "regression"
    assert m.targets["label_value"].stats.count == m.splits["train"].count
    m = import_deeplense(tmp_path / "M", tmp_path / "out2", value_name="mass").manifest
    assert "mass" in m.targets


def test_deeplense_split_is_stratified_by_class_and_seeded(tmp_path):
    make_deeplense(tmp_path / "M", size=8, per_class=30, classes=("a", "b", "c", "d"), valued=())
    m1 = import_deeplense(tmp_path / "M", tmp_path / "o1", PackOptions(val=0.2, test=0.1, seed=4)).manifest
    m2 = import_deeplense(tmp_path / "M", tmp_path / "o2", PackOptions(val=0.2, test=0.1, seed=4)).manifest
    counts = m1.targets["class"].class_counts
    assert counts["val"] == dict.fromkeys("abcd", 6)
    assert counts["test"] == dict.fromkeys("abcd", 3)
    assert counts["train"] == dict.fromkeys("abcd", 21)
    files = [[lab["file"] for _, lab in read_all(d)] for d in (tmp_path / "o1", tmp_path / "o2")]
    assert files[0] == files[1]
    assert files[0] != sorted(files[0])  # shards mix classes
    assert (m1.splits["train"].shards[0].sha256 == m2.splits["train"].shards[0].sha256)


def test_deeplense_split_folders_are_pooled(tmp_path):
    make_deeplense(tmp_path / "ds" / "train", size=8, per_class=8, classes=("no", "sphere", "vort"), valued=())
    make_deeplense(tmp_path / "ds" / "val", size=8, per_class=2, classes=("no", "sphere", "vort"), valued=(), seed=1)
    m = import_deeplense(tmp_path / "ds", tmp_path / "out").manifest
    assert m.source["layout"] == "split-folders"
    assert m.targets["class"].classes == ["no", "sphere", "vort"]
    assert sum(s.count for s in m.splits.values()) == 30


def test_deeplense_corrupt_file_is_named(tmp_path):
    make_deeplense(tmp_path / "M", size=8, per_class=6)
    bad = tmp_path / "M" / "cdm" / "cdm_sim_0003.npy"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(BadSample, match=r"cdm_sim_0003\.npy: cannot read \.npy"):
        import_deeplense(tmp_path / "M", tmp_path / "out", PackOptions(workers=2))
    assert not (tmp_path / "out").exists()
    result = import_deeplense(tmp_path / "M", tmp_path / "out", PackOptions(skip_bad=True))
    assert len(result.skipped) == 1 and "cdm_sim_0003.npy" in result.skipped[0]
    assert result.manifest.source["skipped"] == 1
    assert sum(s.count for s in result.manifest.splits.values()) == 17


def test_deeplense_misshaped_image_is_named_even_when_packed_first(tmp_path):
    make_deeplense(tmp_path / "M", size=16, per_class=6, valued=())
    np.save(tmp_path / "M/cdm/cdm_sim_0002.npy", np.zeros((12, 12), np.float32))
    np.save(tmp_path / "M/no_sub/no_sub_sim_0001.npy", np.zeros((16, 16, 4), np.float32))
    with pytest.raises(BadSample, match=r"(cdm_sim_0002|no_sub_sim_0001)\.npy: image has shape"):
        import_deeplense(tmp_path / "M", tmp_path / "out")
    result = import_deeplense(tmp_path / "M", tmp_path / "out", PackOptions(skip_bad=True))
    assert len(result.skipped) == 2
    assert result.manifest.image.shape == (1, 16, 16)
    for seed in range(6):  # whichever sample is packed first, the common shape wins
        r = import_deeplense(tmp_path / "M", tmp_path / f"s{seed}", PackOptions(skip_bad=True, seed=seed))
        assert len(r.skipped) == 2


def test_deeplense_source_errors(tmp_path):
    with pytest.raises(SourceError, match="not a directory"):
        import_deeplense(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        import_deeplense(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "cdm").mkdir()
    with pytest.raises(SourceError, match="holds no .npy files"):
        import_deeplense(tmp_path / "empty", tmp_path / "out")


# --------------------------------------------------------------------------- no code from files

class RunsACommand:
    """Pickles as a call of ``os.system(command)``: what a crafted DeepLense file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_npy(path: Path, marker: Path) -> Path:
    """An ``[image, label]``-shaped object array whose pickle runs ``touch marker`` when fully unpickled."""
    np.save(path, np.array([RunsACommand(f"touch {marker}"), 1], dtype=object), allow_pickle=True)
    return path


def run_shards(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "LENSTRAIN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "shards", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_crafted_pickle_is_refused_by_import_deeplense_and_runs_nothing(tmp_path):
    probe = tmp_path / "PROBE"
    np.load(hostile_npy(tmp_path / "probe.npy", probe), allow_pickle=True)  # a plain unpickle runs it
    assert probe.exists()

    make_deeplense(tmp_path / "M", size=16, per_class=4)
    marker = tmp_path / "MARKER"
    bad = hostile_npy(tmp_path / "M" / "cdm" / "cdm_sim_0000.npy", marker)  # read first, by the probe too
    result = run_shards("import", "deeplense", tmp_path / "M", "--out", tmp_path / "out", "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert f"error: {bad}: refused to load: its pickle asks for posix.system" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()

    result = run_shards("import", "deeplense", tmp_path / "M", "--out", tmp_path / "out", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad samples" in result.stderr and f"{bad}: refused to load" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("value", [np.float64(2.5e-23), np.int64(3), 7], ids=["float64", "int64", "int"])
def test_deeplense_object_arrays_with_numpy_scalars_import(tmp_path, value):
    make_deeplense(tmp_path / "M", size=16, per_class=3, valued=())
    image = np.random.default_rng(5).random((16, 16)).astype(np.float32)
    np.save(tmp_path / "M" / "cdm" / "0_first.npy", np.array([image, value], dtype=object), allow_pickle=True)
    m = import_deeplense(tmp_path / "M", tmp_path / "out", PackOptions(val=0, test=0)).manifest
    assert m.source["value_classes"] == ["cdm"]
    (packed,) = [(img, lab) for img, lab in read_all(tmp_path / "out") if lab["file"] == "cdm/0_first.npy"]
    assert packed[0].tobytes() == image[None].tobytes() and packed[1]["label_value"] == float(value)


def test_object_arrays_written_by_numpy_1_and_numpy_2_both_load(tmp_path):
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    np.save(tmp_path / "a.npy", np.array([image, 1.5], dtype=object), allow_pickle=True)
    data = (tmp_path / "a.npy").read_bytes()
    spellings = {b"numpy.core.multiarray\n", b"numpy._core.multiarray\n"}
    (written,) = [s for s in spellings if s in data]
    (other,) = spellings - {written}
    (tmp_path / "b.npy").write_bytes(data.replace(written, other))
    for name in ("a.npy", "b.npy"):
        loaded = read_npy(tmp_path / name)
        assert loaded[0].tobytes() == image.tobytes() and loaded[1] == 1.5


# --------------------------------------------------------------------------- arrays

def test_arrays_csv_labels_several_targets(tmp_path):
    n = 50
    rng = np.random.default_rng(2)
    images = rng.random((n, 3, 10, 10)).astype(np.float32)
    np.save(tmp_path / "X.npy", images)
    kinds = np.array(["cdm", "axion", "no_sub"])[np.arange(n) % 3]
    mass = rng.random(n)
    lines = ["einstein_radius,kind,mass"] + [f"{1 + i / n},{kinds[i]},{'' if i == 4 else mass[i]}" for i in range(n)]
    (tmp_path / "y.csv").write_text("\n".join(lines) + "\n")
    labels = load_labels(tmp_path / "y.csv")
    assert list(labels) == ["einstein_radius", "kind", "mass"]
    m = pack_arrays(tmp_path / "X.npy", labels, tmp_path / "a").manifest
    assert m.primary_target == "einstein_radius" and m.target.kind == "regression"
    assert m.targets["kind"].classes == ["axion", "cdm", "no_sub"]
    assert m.targets["mass"].kind == "regression"
    for image, lab in read_all(tmp_path / "a"):
        i = lab["index"]
        assert image.tobytes() == images[i].tobytes()
        assert m.targets["kind"].classes[lab["kind"]] == kinds[i]
        assert lab["mass"] is None if i == 4 else lab["mass"] == mass[i]
    m = pack_arrays(tmp_path / "X.npy", labels, tmp_path / "b", primary="kind").manifest
    assert m.primary_target == "kind"
    val = m.target.class_counts["val"]  # 17/17/16 samples per class, val 0.1
    assert sum(val.values()) == 5 and set(val.values()) <= {1, 2}
    with pytest.raises(SourceError, match="missing in 1 rows"):
        pack_arrays(tmp_path / "X.npy", labels, tmp_path / "c", primary="mass")


def test_arrays_npy_labels_classification_and_nhw(tmp_path):
    images = np.random.default_rng(0).random((40, 12, 12))
    np.save(tmp_path / "X.npy", images)
    np.save(tmp_path / "y.npy", np.arange(40) % 4)
    labels = load_labels(tmp_path / "y.npy", classification=True)
    m = pack_arrays(tmp_path / "X.npy", labels, tmp_path / "o", PackOptions(workers=2), classification=True).manifest
    assert m.image.shape == (1, 12, 12) and m.primary_target == "class"
    assert m.target.classes == ["0", "1", "2", "3"]
    for image, lab in read_all(tmp_path / "o"):
        assert lab["class"] == lab["index"] % 4
        assert image.tobytes() == images[lab["index"]].astype(np.float32)[None].tobytes()
    m = pack_arrays(tmp_path / "X.npy", load_labels(tmp_path / "y.npy", "einstein_radius"), tmp_path / "r").manifest
    assert m.primary_target == "einstein_radius" and m.target.kind == "regression"


def test_arrays_errors(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((10, 8, 8), np.float32))
    np.save(tmp_path / "X5.npy", np.zeros((10, 2, 8, 8, 1), np.float32))
    np.save(tmp_path / "y.npy", np.arange(9.0))
    with pytest.raises(SourceError, match="10 images but 9 values"):
        pack_arrays(tmp_path / "X.npy", load_labels(tmp_path / "y.npy"), tmp_path / "o")
    with pytest.raises(SourceError, match="expected \\(N,H,W\\)"):
        pack_arrays(tmp_path / "X5.npy", {"y": np.arange(10.0)}, tmp_path / "o")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SourceError, match="bad.npy: cannot read images"):
        pack_arrays(tmp_path / "bad.npy", {"y": np.arange(10.0)}, tmp_path / "o")
    (tmp_path / "y.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(SourceError, match=r"y.csv:3: 1 fields"):
        load_labels(tmp_path / "y.csv")
    assert not (tmp_path / "o").exists()
