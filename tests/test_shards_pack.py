"""Packing: exact round trips through three readers, determinism, splits, statistics, failure safety."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import load_manifest
from shards.options import PackOptions
from shards.pack import BadSample, OutputExistsError, TargetSpec, pack_shard_set
from shards.reader import ShardReader
from shards.sources.arrays import pack_arrays


def _images(n: int, shape=(1, 24, 24), seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *shape)) * 3 + 1).astype(np.float32)


def _packed_by_index(directory: Path) -> dict[int, tuple[np.ndarray, dict]]:
    """Every sample of every split, read with ShardReader, keyed by its source row."""
    out = {}
    for split in load_manifest(directory).splits:
        reader = ShardReader(directory, split)
        for i in range(len(reader)):
            image, labels = reader.read(i)
            out[labels["index"]] = (image, labels)
        reader.close()
    return out


class Crashing:
    """A sample function that fails like a bug (not a BadSample) at one index."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, i: int):
        if i == self.at:
            raise RuntimeError(f"simulated crash at sample {i}")
        return np.full((1, 8, 8), float(i), np.float32), {"y": float(i)}


class Constant:
    def __init__(self, value: float, missing_every: int = 0):
        self.value = value
        self.missing_every = missing_every

    def __call__(self, i: int):
        y = None if self.missing_every and i % self.missing_every == 0 else float(i)
        return np.full((1, 8, 8), self.value, np.float32), {"y": y}


def _pack_simple(out: Path, fn, n: int = 40, **options):
    return pack_shard_set(out, sample_fn=fn, split_of=["train"] * (n - 10) + ["val"] * 10,
                          targets=[TargetSpec("y", "regression")], primary_target="y", source={"kind": "test"},
                          options=PackOptions(shard_size=8, **options))


# --------------------------------------------------------------------------- round trips

@pytest.fixture(scope="module")
def float32_set(tmp_path_factory):
    images = _images(120)
    labels = {"class": np.arange(120) % 3, "y": np.linspace(0.0, 1.0, 120)}
    out = tmp_path_factory.mktemp("f32") / "set"
    pack_arrays(images, labels, out, PackOptions(shard_size=16, workers=1), classification=True)
    return images, labels, out


def test_float32_round_trip_is_exact_via_shard_reader(float32_set):
    images, labels, out = float32_set
    packed = _packed_by_index(out)
    assert sorted(packed) == list(range(len(images)))
    for row, (image, lab) in packed.items():
        assert image.dtype == np.float32 and image.shape == images[row].shape
        assert image.tobytes() == images[row].tobytes()
        assert lab["class"] == labels["class"][row]
        assert lab["y"] == labels["y"][row]


def test_float32_round_trip_is_exact_via_tarfile(float32_set):
    images, _, out = float32_set
    seen = 0
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert all(not m.name.startswith("/") and m.isfile() for m in members)
            for m_image, m_json in zip(members[::2], members[1::2], strict=True):
                assert m_image.name.endswith(".image.npy") and m_json.name.endswith(".json")
                assert m_image.name.split(".")[0] == m_json.name.split(".")[0]
                image = np.load(io.BytesIO(tar.extractfile(m_image).read()), allow_pickle=False)
                row = json.loads(tar.extractfile(m_json).read())["index"]
                assert image.tobytes() == images[row].tobytes()
                seen += 1
        assert len(names) == len(set(names))
    assert seen == len(images)


def test_float32_round_trip_is_exact_via_webdataset(float32_set):
    import webdataset as wds

    images, _, out = float32_set
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    seen = set()
    for sample in dataset:
        row = sample["json"]["index"]
        image = sample["image.npy"]
        assert isinstance(image, np.ndarray) and image.dtype == np.float32
        assert image.tobytes() == images[row].tobytes()
        seen.add(row)
    assert seen == set(range(len(images)))


def test_float16_round_trip_is_within_tolerance(tmp_path):
    images = _images(30)
    out = tmp_path / "f16"
    result = pack_arrays(images, {"y": np.arange(30.0)}, out, PackOptions(dtype="float16", shard_size=7))
    assert result.manifest.image.dtype == "float16"
    for row, (image, _) in _packed_by_index(out).items():
        assert image.dtype == np.float16
        np.testing.assert_allclose(image.astype(np.float32), images[row], rtol=1e-3, atol=1e-3)


def test_float16_overflow_is_a_bad_sample(tmp_path):
    images = _images(20)
    images[5, 0, 0, 0] = 1e6
    with pytest.raises(BadSample, match=r"images\[5\].*overflow float16"):
        pack_arrays(images, {"y": np.arange(20.0)}, tmp_path / "o", PackOptions(dtype="float16"))
    assert not (tmp_path / "o").exists()


def test_members_carry_offsets_and_crcs_that_match_the_tar(float32_set):
    import zlib

    _, _, out = float32_set
    manifest = load_manifest(out)
    for split in manifest.splits.values():
        for shard in split.shards:
            data = (out / shard.name).read_bytes()
            assert len(data) == shard.bytes
            for m in shard.members:
                image = data[m.image_offset:m.image_offset + m.image_size]
                assert zlib.crc32(image) == m.image_crc32
                assert zlib.crc32(data[m.json_offset:m.json_offset + m.json_size]) == m.json_crc32


# --------------------------------------------------------------------------- determinism

def test_workers_1_and_2_give_byte_identical_shard_sets(tmp_path):
    images = _images(90, shape=(3, 16, 16))
    labels = {"class": np.arange(90) % 3}
    sets = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        pack_arrays(images, labels, out, PackOptions(shard_size=10, workers=workers, seed=3), classification=True)
        sets.append(out)
    names = sorted(p.name for p in sets[0].iterdir())
    assert names == sorted(p.name for p in sets[1].iterdir())
    assert "manifest.json" in names and len(names) > 5
    for name in names:
        assert (sets[0] / name).read_bytes() == (sets[1] / name).read_bytes(), name


def _split_rows(directory: Path) -> dict[str, list[int]]:
    out = {}
    for split in load_manifest(directory).splits:
        reader = ShardReader(directory, split)
        out[split] = sorted(reader.labels(i)["index"] for i in range(len(reader)))
    return out


def test_split_is_deterministic_for_a_seed_and_stratified_by_class(tmp_path):
    n = 300
    images = _images(n, shape=(1, 8, 8))
    classes = np.repeat([0, 1, 2], [150, 100, 50])
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        pack_arrays(images, {"class": classes}, tmp_path / name,
                    PackOptions(val=0.1, test=0.2, shard_size=50, seed=seed), classification=True)
    a, b, c = (_split_rows(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c
    for rows in (a, c):
        for split, frac in (("val", 0.1), ("test", 0.2), ("train", 0.7)):
            counts = np.bincount(classes[rows[split]], minlength=3)
            np.testing.assert_allclose(counts, np.array([150, 100, 50]) * frac, atol=1)
    manifest = load_manifest(tmp_path / "a")
    assert manifest.target.class_counts["val"] == {"0": 15, "1": 10, "2": 5}


def test_regression_split_is_stratified_by_quantile_bins(tmp_path):
    n = 1000
    rng = np.random.default_rng(0)
    y = rng.lognormal(size=n)
    pack_arrays(_images(n, shape=(1, 4, 4)), {"y": y}, tmp_path / "r", PackOptions(val=0.1, test=0.1, shard_size=200))
    rows = _split_rows(tmp_path / "r")
    edges = np.quantile(y, np.linspace(0, 1, 11)[1:-1])
    bins = np.searchsorted(edges, y, side="right")
    for split in ("val", "test"):
        per_bin = np.bincount(bins[rows[split]], minlength=10)
        assert per_bin.sum() == 100
        assert per_bin.min() >= 9 and per_bin.max() <= 11, per_bin


# --------------------------------------------------------------------------- statistics

def test_label_and_pixel_stats_come_from_train_only(tmp_path):
    n = 200
    images = _images(n, shape=(1, 6, 6))
    y = np.random.default_rng(5).normal(10, 4, size=n)
    out = tmp_path / "s"
    pack_arrays(images, {"y": y}, out, PackOptions(val=0.2, test=0.2))
    manifest = load_manifest(out)
    train = np.asarray(_split_rows(out)["train"])
    assert len(train) == 120
    stats = manifest.targets["y"].stats
    assert stats.count == len(train)
    np.testing.assert_allclose([stats.mean, stats.std, stats.min, stats.max],
                               [y[train].mean(), y[train].std(), y[train].min(), y[train].max()], rtol=1e-9)
    assert abs(stats.mean - y.mean()) > 1e-6  # all samples would give another answer
    px = manifest.image.stats
    pixels = images[train].astype(np.float64)
    np.testing.assert_allclose([px.mean, px.std, px.min, px.max],
                               [pixels.mean(), pixels.std(), pixels.min(), pixels.max()], rtol=1e-6)
    assert px.count == pixels.size


def test_regression_stats_skip_samples_without_a_value(tmp_path):
    result = _pack_simple(tmp_path / "m", Constant(1.0, missing_every=3))
    stats = result.manifest.targets["y"].stats
    present = [float(i) for i in range(30) if i % 3]
    assert stats.count == len(present)
    assert stats.mean == pytest.approx(np.mean(present))


# --------------------------------------------------------------------------- failure safety

def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("workers", [1, 2])
def test_crash_mid_pack_leaves_nothing_behind(tmp_path, workers):
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _pack_simple(out, Crashing(at=25), workers=workers)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_crash_while_overwriting_keeps_the_old_set(tmp_path):
    out = tmp_path / "keep"
    _pack_simple(out, Constant(2.0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError):
        _pack_simple(out, Crashing(at=3), overwrite=True, workers=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite_and_overwrite_replaces(tmp_path):
    out = tmp_path / "o"
    _pack_simple(out, Constant(1.0))
    with pytest.raises(OutputExistsError, match=str(out)):
        _pack_simple(out, Constant(2.0))
    assert ShardReader(out, "train").read(0)[0][0, 0, 0] == 1.0
    _pack_simple(out, Constant(2.0), overwrite=True)
    assert ShardReader(out, "train").read(0)[0][0, 0, 0] == 2.0
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_directory_that_is_not_a_shard_set(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not a shard set"):
        _pack_simple(out, Constant(1.0), overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_a_shard_set_is_readable_by_others_under_the_usual_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        pack_shard_set(tmp_path / "set", sample_fn=_umask_sample, split_of=["train"] * 3,
                       targets=[TargetSpec("y", "regression")], primary_target="y", source={})
    finally:
        os.umask(old)
    assert (tmp_path / "set").stat().st_mode & 0o777 == 0o755


def _umask_sample(i):
    import numpy as np

    return np.full((1, 4, 4), i, dtype=np.float32), {"y": float(i)}


@pytest.mark.parametrize(("options", "message"), [
    ({"shard_size": 0}, "--shard-size must be an integer of at least 1, got 0"),
    ({"workers": 0}, "--workers must be an integer of at least 1, got 0"),
    ({"seed": -1}, "--seed must be an integer of at least 0, got -1"),
    ({"dtype": "float64"}, "--dtype must be one of float32, float16, got 'float64'"),
    ({"val": 1.0}, "--val must be in [0, 1), got 1.0"),
    ({"val": 0.5, "test": 0.5}, "--val (0.5) plus --test (0.5) must be below 1"),
])
def test_pack_options_refuse_bad_values_naming_the_option(options, message):
    from shards.clikit import UsageError

    with pytest.raises(UsageError) as exc:
        PackOptions(**options)
    assert str(exc.value) == message
