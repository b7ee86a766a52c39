"""Simulated lensing shard sets: physics sanity, labels per task, determinism, no shortcut, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from shards.manifest import load_manifest
from shards.reader import ShardReader
from shards.simulate import SimulateError, simulate
from shards.simulate import physics as P
from shards.simulate.cli import plan
from shards.simulate.presets import INSTRUMENTS, get_instrument
from shards.simulate.scenarios import PRESETS
from shards.simulate.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "LENSTRAIN_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
FAST = {"instrument": "euclid", "workers": 1}  # 64x64: quick to render


def _all_samples(directory: Path) -> list[tuple[np.ndarray, dict]]:
    manifest = load_manifest(directory)
    out = []
    for split in manifest.splits:
        reader = ShardReader(directory, split, manifest)
        out.extend(reader.read(i) for i in range(len(reader)))
        reader.close()
    return out


def _shards(manifest) -> dict[str, str]:
    return {s.name: s.sha256 for split in manifest.splits.values() for s in split.shards}


def _shards_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shards", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------------------------------ physics
def test_einstein_radius_and_profiles():
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    # theta_E^2 = 4GM/c^2 D_ls/(D_l D_s) for z_l=0.5, z_s=1, flat LCDM H0=70, Om=0.3: 1.66" for 1e12 M_sun.
    assert P.einstein_radius(1e12) == pytest.approx(1.6645, abs=2e-3)
    assert P.einstein_radius(1e10) == pytest.approx(P.einstein_radius(1e12) / 10)
    # de Broglie wavelength h/(m v) at the lens: ~0.1" at 1e-22 eV, inversely proportional to the mass.
    assert P.de_broglie_wavelength(1e-22) == pytest.approx(0.0987, rel=0.01)
    assert P.de_broglie_wavelength(1e-24) == pytest.approx(100 * P.de_broglie_wavelength(1e-22))
    # A granule (Gaussian convergence) deflects like a point mass of the same mass from afar.
    lens = LensModel(["GAUSSIAN", "POINT_MASS"])
    theta, x, y = 0.1, np.array([1.5, -2.0]), np.array([0.3, 1.0])
    gauss = lens.alpha(
        x,
        y,
        [
            {"amp": math.pi * theta**2, "sigma": 0.05, "center_x": 0, "center_y": 0},
            {"theta_E": 0.0, "center_x": 0, "center_y": 0},
        ],
    )
    point = lens.alpha(
        x,
        y,
        [
            {"amp": 0.0, "sigma": 0.05, "center_x": 0, "center_y": 0},
            {"theta_E": theta, "center_x": 0, "center_y": 0},
        ],
    )
    np.testing.assert_allclose(gauss, point, rtol=1e-3)
    # The Sersic amplitude is set so that the unlensed source has the drawn total flux.
    config = plan("substructure", 3, instrument="model1", seed=3)
    params = P.draw_params(config, 0)
    _, _, models, kwargs_source = P.lenstronomy_kwargs(params)
    assert LightModel(models).total_flux(kwargs_source)[0] == pytest.approx(params["source_flux"], rel=1e-6)


def test_substructure_takes_mass_from_main_lens():
    config = plan("substructure", 6, seed=5)
    for i in range(6):
        p = P.draw_params(config, i)
        total = 10 ** p["halo_mass"]
        sub = sum(p["subhalo_mass"])
        assert p["lensing_mass"] == pytest.approx(total)
        assert p["subhalo_fraction"] == pytest.approx(sub / total)
        assert P.einstein_radius(total - sub) == pytest.approx(p["sie_einstein_radius"])
        assert p["einstein_radius"] == pytest.approx(P.einstein_radius(total))


# ------------------------------------------------------------------------------------------ labels per task
@pytest.mark.parametrize("task", list(TASKS))
def test_labels_per_task(tmp_path, task):
    manifest = simulate(task, 12, tmp_path / task, seed=11, **FAST)
    spec = TASKS[task]
    assert manifest.primary_target == spec.primary.name
    assert manifest.target.kind == spec.primary.kind
    assert manifest.image.shape == (1, 64, 64)
    assert manifest.source["kind"] == "simulate" and manifest.source["seed"] == 11
    samples = _all_samples(tmp_path / task)
    assert len(samples) == 12
    lo_m, hi_m = P.LOG_HALO_MASS
    for image, labels in samples:
        assert image.shape == (1, 64, 64) and image.dtype == np.float32 and np.isfinite(image).all()
        cls = labels["substructure_name"]
        assert cls in spec.classes and P.SUBSTRUCTURE_CLASSES[labels["substructure"]] == cls
        assert lo_m <= labels["halo_mass"] <= hi_m
        assert labels["einstein_radius"] == pytest.approx(
            P.einstein_radius(labels["lensing_mass"], labels["z_lens"], labels["z_source"])
        )
        if task == "halo_mass":  # drawn redshifts and a 0.2 dex scatter (2-sigma truncated)
            assert 0.4 <= labels["z_lens"] <= 0.7 and 1.2 <= labels["z_source"] <= 2.5
            assert abs(math.log10(labels["lensing_mass"]) - labels["halo_mass"]) <= 0.4 + 1e-9
        else:  # fixed redshifts, the lensing mass is the halo mass
            assert (labels["z_lens"], labels["z_source"]) == (P.Z_LENS, P.Z_SOURCE)
            assert labels["lensing_mass"] == pytest.approx(10 ** labels["halo_mass"])
            assert 0.66 < labels["einstein_radius"] < 1.9
        assert P.LENS_AXIS_RATIO[0] <= labels["axis_ratio"] <= 1.0 and 0 <= labels["shear"] <= P.SHEAR_MAX
        assert P.SOURCE_MAGNITUDE[0] <= labels["source_magnitude"] <= P.SOURCE_MAGNITUDE[1]
        lo_t, hi_t = INSTRUMENTS["euclid"].exposure
        assert lo_t <= labels["exposure"] <= hi_t
        if cls == "no_sub":
            assert labels["subhalo_fraction"] == 0 and labels["n_subhalos"] == 0
        else:
            assert P.SUBHALO_FRACTION[0] <= labels["subhalo_fraction"] <= P.SUBHALO_FRACTION[1]
            assert labels["n_subhalos"] == len(labels["subhalo_x"]) >= 1
        if cls == "axion":
            assert -24 <= labels["axion_mass"] <= -22
            assert labels["axion_mass_ev"] == pytest.approx(10 ** labels["axion_mass"])
            assert labels["de_broglie_wavelength"] == pytest.approx(
                P.de_broglie_wavelength(labels["axion_mass_ev"])
            )
        else:
            assert labels["axion_mass"] is None
        for target in spec.targets:
            assert labels[target.name] is not None
    if spec.regression:
        stats_ = manifest.target.stats
        assert stats_ is not None and stats_.min < stats_.max


def test_class_balance_and_stratified_split(tmp_path):
    manifest = simulate("substructure", 60, tmp_path / "s", seed=2, val=0.2, test=0.2, **FAST)
    counts = manifest.target.class_counts
    totals = {c: sum(counts[s][c] for s in counts) for c in ("no_sub", "cdm", "vortex")}
    assert totals == {"no_sub": 20, "cdm": 20, "vortex": 20}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        assert counts[split] == {"no_sub": n, "cdm": n, "vortex": n}


def test_preset_overrides(tmp_path):
    manifest = simulate("halo_mass", 6, tmp_path / "o", instrument="hst", size=48, pixel_scale=0.1, workers=1)
    assert manifest.image.shape == (1, 48, 48)
    assert manifest.source["instrument"]["pixel_scale"] == 0.1
    assert manifest.source["instrument"]["psf_fwhm"] == INSTRUMENTS["hst"].psf_fwhm


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_byte_identical_for_any_worker_count(tmp_path):
    one = simulate("substructure", 30, tmp_path / "w1", seed=4, instrument="euclid", workers=1, shard_size=8)
    two = simulate("substructure", 30, tmp_path / "w2", seed=4, instrument="euclid", workers=2, shard_size=8)
    assert _shards(one) == _shards(two)
    assert (tmp_path / "w1/manifest.json").read_bytes() == (tmp_path / "w2/manifest.json").read_bytes()
    other = simulate(
        "substructure", 30, tmp_path / "s5", seed=5, instrument="euclid", workers=1, shard_size=8
    )
    assert set(_shards(other).values()).isdisjoint(_shards(one).values())


def test_sample_is_pure_function_of_seed_and_index():
    config = plan("axion_mass", 5, instrument="euclid", seed=9)
    a = P.Simulator(config)(3)
    P.Simulator(config)(1)  # other work in between (and a warm model cache) changes nothing
    b = P.Simulator(config)(3)
    assert a[0].tobytes() == b[0].tobytes() and json.dumps(a[1]) == json.dumps(b[1])


# ------------------------------------------------------------------------------------------ no shortcut, real signal
def _class_statistics(preset: str, per_class: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per image: total flux, background noise level (MAD of the noise where the lensed light is faint), the paired change of the
    noise-free flux caused by the substructure, and the reduced chi^2 of the image against the smooth
    lens (the same main lens and source with no substructure)."""
    config = plan("substructure", 3 * per_class, preset=preset, seed=seed)
    inst = config.instrument
    out = {c: {"flux": [], "noise": [], "flux_change": [], "chi2": []} for c in config.classes}
    for i in range(3 * per_class):
        p = P.draw_params(config, i)
        image = P.render(config, p)[0].astype(np.float64)
        clean = P.render_clean(config, p)
        smooth = P.render_clean(config, P.smooth_twin(p))
        sigma = P.noise_sigma(smooth, inst, p["exposure"])
        # The background noise alone: the image minus its noise-free rendering, on the pixels the lensed light
        # does not reach (noise-free flux below 5% of the sky). With the substructure's mass added on top (the
        # DeepLense presets) a cdm ring is slightly larger, and arc light would raise the Poisson noise of a
        # fixed border frame: that says nothing about the noise model.
        residual = (image - clean)[clean < 0.05 * inst.sky_per_pixel]
        row = out[p["substructure_name"]]
        row["flux"].append(image.sum())
        row["noise"].append(1.4826 * np.median(np.abs(residual - np.median(residual))))
        row["flux_change"].append(math.log(clean.sum() / smooth.sum()))
        row["chi2"].append(np.mean(((image - smooth) / sigma) ** 2))
    return {c: {k: np.asarray(v) for k, v in row.items()} for c, row in out.items()}


# The weakest signals that must still show: on the 150x150 grids the same substructure spreads over 5x the
# pixels, so the realistic model1 cdm moves the median chi^2 by ~1.6% and DeepLense Model I's vortex (peak
# S/N ~25) by ~3%.
MIN_MEDIAN_CHI2 = {"model1": 1.01, "deeplense1": 1.02}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_brightness_or_noise_shortcut_but_real_signal(preset):
    s = _class_statistics(preset, per_class=40, seed=7)
    base = s["no_sub"]
    # no_sub against its own smooth lens is pure noise: reduced chi^2 ~ 1.
    assert abs(np.median(base["chi2"]) - 1) < 0.03
    assert np.all(base["flux_change"] == 0)
    for cls in ("cdm", "vortex"):
        other = s[cls]
        # 1. Same distributions of total flux and of background noise (two-sample KS tests).
        assert stats.ks_2samp(base["flux"], other["flux"]).pvalue > 0.01, cls
        assert stats.ks_2samp(base["noise"], other["noise"]).pvalue > 0.01, cls
        # Mean flux within 3 standard errors.
        se = math.sqrt(base["flux"].var() / len(base["flux"]) + other["flux"].var() / len(other["flux"]))
        assert abs(other["flux"].mean() - base["flux"].mean()) < 3 * se, cls
        # 2. Paired: the substructure changes the total (noise-free) flux by ~1%, against a spread of
        #    tens of percent between images: no usable brightness cue. Added on top of the main lens (the
        #    DeepLense presets, as DeepLenseSim) CDM's ~4e10 M_sun magnifies by ~2.4% on average (sd 2.9%)
        #    against a spread of 23%; the KS test above shows it cannot be read off the flux.
        added = PRESETS[preset].physics.substructure_mass == "added"
        assert abs(other["flux_change"].mean()) < (0.05 if added else 0.03), cls
        assert other["flux_change"].mean() < (0.2 if added else 0.1) * np.log(base["flux"]).std(), cls
        # 3. Signal: the image departs from the smooth lens well beyond the noise.
        assert stats.ks_2samp(base["chi2"], other["chi2"]).pvalue < 1e-6, cls
        assert np.median(other["chi2"]) > MIN_MEDIAN_CHI2.get(preset, 1.03), cls


# ------------------------------------------------------------------------------------------ API and CLI errors
def test_api_rejects_bad_arguments(tmp_path):
    with pytest.raises(SimulateError, match="unknown task 'nope'; valid choices: substructure"):
        simulate("nope", 3, tmp_path / "a")
    with pytest.raises(SimulateError, match="unknown instrument 'jwst'; valid choices: model1, euclid, hst"):
        simulate("substructure", 3, tmp_path / "a", instrument="jwst")
    for n in (0, -1):
        with pytest.raises(SimulateError, match="n must be a positive integer"):
            simulate("substructure", n, tmp_path / "a")
    with pytest.raises(ValueError):
        get_instrument("model1", pixel_scale=0.0)


def test_cli_simulate_verify_and_grid(tmp_path):
    out, grid = tmp_path / "set", tmp_path / "grid.png"
    r = _shards_cli(
        "simulate",
        "--task",
        "substructure",
        "--n",
        "24",
        "--out",
        str(out),
        "--instrument",
        "hst",
        "--workers",
        "2",
        "--seed",
        "1",
        "--grid",
        str(grid),
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and grid.is_file() and grid.stat().st_size > 10_000
    r = _shards_cli("verify", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    # The output exists now: refused without --overwrite, exit 2.
    r = _shards_cli("simulate", "--task", "substructure", "--n", "3", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope", "--n", "3"], "invalid choice: 'nope' (choose from 'substructure', 'halo_mass'"),
        (
            ["--task", "substructure", "--n", "3", "--instrument", "jwst"],
            "choose from 'model1', 'euclid', 'hst'",
        ),
        (["--task", "substructure", "--n", "0"], "argument --n: must be positive, got 0"),
        (["--task", "substructure", "--n", "-5"], "argument --n: must be positive, got -5"),
        (["--task", "substructure", "--n", "3", "--val", "0.6", "--test", "0.5"], "must be below 1"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, args, message):
    r = _shards_cli("simulate", *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ presets and knobs
def test_deeplense2_reproduces_model_ii_physics(tmp_path):
    config = plan("substructure", 9, preset="deeplense2", seed=3)
    assert config.instrument.name == "euclid" and config.instrument.size == 64
    for i in range(9):
        p = P.draw_params(config, i)
        # Fixed main lens: SIE of 1e12 M_sun at z=0.5 with e1=0.1, centred, and shear gamma1=0.05.
        assert p["halo_mass"] == 12.0 and p["z_lens"] == 0.5 and p["z_source"] == 1.0
        assert (p["lens_e1"], p["lens_e2"], p["lens_x"], p["lens_y"]) == pytest.approx(
            (0.1, 0, 0, 0), abs=1e-12
        )
        assert (p["gamma1"], p["gamma2"]) == pytest.approx((0.05, 0.0), abs=1e-12)
        # Magnitude-20 Sersic source, R=0.25", n=1, centred within +-0.35".
        assert p["source_magnitude"] == 20 and p["source_radius"] == 0.25 and p["source_index"] == 1
        assert max(abs(p["source_x"]), abs(p["source_y"])) <= 0.35
        assert p["exposure"] == pytest.approx(4 * 565.0)
        mass = np.asarray(p["subhalo_mass"])
        if p["substructure_name"] == "cdm":  # 25 point masses of 1e6-1e10 M_sun at 0.25"-2"
            radius = np.hypot(p["subhalo_x"], p["subhalo_y"])
            assert len(mass) == 25 and mass.min() >= 1e6 and mass.max() <= 1e10
            assert radius.min() >= 0.25 and radius.max() <= 2.0
        elif (
            p["substructure_name"] == "vortex"
        ):  # 100 point masses, 1e10 M_sun, a 0.06"-6" line through the centre
            assert len(mass) == 100 and mass.sum() == pytest.approx(1e10)
            assert np.mean(p["subhalo_x"]) == pytest.approx(0, abs=1e-9)
            ends = np.hypot(
                np.diff(np.asarray(p["subhalo_x"])[[0, -1]]), np.diff(np.asarray(p["subhalo_y"])[[0, -1]])
            )
            assert ends[0] == pytest.approx(p["vortex_length"]) and 0.06 <= ends[0] <= 6.0
        # DeepLenseSim adds the substructure on top of the main lens: the SIE keeps its 1e12 M_sun.
        assert p["sie_einstein_radius"] == pytest.approx(P.einstein_radius(1e12))
    # Stored as DeepLense's files: each image divided by its maximum.
    manifest = simulate("substructure", 6, tmp_path / "dl2", preset="deeplense2", workers=1)
    assert manifest.source["preset"] == "deeplense2" and manifest.source["scenario"]["scaling"] == "max"
    for image, _ in _all_samples(tmp_path / "dl2"):
        assert image.max() == pytest.approx(1.0)


def test_physics_overrides_are_applied_and_recorded(tmp_path):
    knobs = {
        "lens": "drawn",
        "source_mag": [22.0, 23.0],
        "subhalos": 5,
        "vortex_mass": 3e9,
        "exposure": 1000,
        "vortex_length": [1.0, 3.0],
        "substructure_mass": "taken",
    }
    manifest = simulate("substructure", 9, tmp_path / "o", preset="deeplense2", physics=knobs, workers=1)
    scenario = manifest.source["scenario"]
    assert (
        scenario["lens"] == "drawn" and scenario["source_mag"] == [22.0, 23.0] and scenario["subhalos"] == 5
    )
    assert scenario["vortex_mass"] == 3e9 and scenario["exposure"] == [1000.0, 1000.0]
    assert scenario["vortex_length"] == [1.0, 3.0] and scenario["substructure_mass"] == "taken"
    for _, labels in _all_samples(tmp_path / "o"):
        assert 22 <= labels["source_magnitude"] <= 23 and labels["exposure"] == pytest.approx(1000)
        assert labels["lens_x"] != 0  # drawn, not DeepLense's centred lens
        if labels["substructure_name"] == "cdm":
            assert labels["n_subhalos"] == 5
        if labels["substructure_name"] == "vortex":
            assert sum(labels["subhalo_mass"]) == pytest.approx(3e9) and 1.0 <= labels["vortex_length"] <= 3.0
        # "taken": the substructure's mass comes out of the SIE
        sie_mass = 10 ** labels["halo_mass"] - sum(labels["subhalo_mass"])
        assert labels["sie_einstein_radius"] == pytest.approx(P.einstein_radius(sie_mass))
    with pytest.raises(SimulateError, match=r"--source-mag: expected LOW\[,HIGH\] in \[15, 30\]"):
        plan("substructure", 3, preset="euclid", physics={"source_mag": 40})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source-mag", "40"], "argument --source-mag: expected LOW[,HIGH] in [15, 30], got '40'"),
        (["--halo-mass", "12,11"], "argument --halo-mass: expected LOW[,HIGH] in [10, 13], got '12,11'"),
        (["--subhalos", "2.5"], "argument --subhalos: expected an integer in [1, 1000], got '2.5'"),
        (["--subhalos", "0"], "argument --subhalos: expected an integer in [1, 1000], got '0'"),
        (
            ["--vortex-mass", "1e14"],
            "argument --vortex-mass: expected a number in [1e+06, 1e+12], got '1e14'",
        ),
        (["--exposure", "long"], "argument --exposure: expected LOW[,HIGH] in [1, 1e+06], got 'long'"),
        (["--lens", "wobbly"], "argument --lens: expected one of fixed, drawn, got 'wobbly'"),
        (
            ["--substructure-mass", "both"],
            "argument --substructure-mass: expected one of taken, added, got 'both'",
        ),
        (["--vortex-length", "30"], "argument --vortex-length: expected LOW[,HIGH] in [0.01, 20], got '30'"),
        (["--z-lens", "0.8", "--z-source", "0.6"], "--z-source: must lie above --z-lens"),
        (["--preset", "deeplense9"], "argument --preset: invalid choice: 'deeplense9'"),
        (
            ["--preset", "deeplense2", "--instrument", "euclid"],
            "argument --instrument: not allowed with argument --preset",
        ),
    ],
)
def test_cli_bad_physics_options_exit_2(tmp_path, args, message):
    r = _shards_cli("simulate", "--task", "substructure", "--n", "3", "--out", str(tmp_path / "x"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", ["model1", "euclid", "hst"])
def test_realistic_halo_mass_is_not_a_lookup_of_the_ring(preset):
    # Redshifts and the scatter of lensing mass around halo mass break the one-to-one map: the ring size
    # explains well under 90% of the variance of the halo mass in the train split.
    from shards.simulate.cli import split_plan

    config = plan("halo_mass", 3000, preset=preset, seed=0)
    split_of, _ = split_plan(config, 3000, val=0.1, test=0.1)
    train = [P.draw_params(config, i) for i, split in enumerate(split_of) if split == "train"]
    theta = np.asarray([p["einstein_radius"] for p in train])
    mass = np.asarray([p["halo_mass"] for p in train])
    r2 = np.corrcoef(theta, mass)[0, 1] ** 2
    assert 0.3 < r2 < 0.9, r2
