"""DeepLenseSim replicas (``--fidelity replica``) and the lens galaxy's light (``--lens-light shmr``).

The replica reproduces DeepLenseSim's own conventions (its Einstein radius from luminosity distances, a 3e10
M_sun vortex, Model I's twice-applied noise, Model II/III noise-free and doubled, Model III's 0.08" PSF);
the lens light ties the central galaxy to its halo and gives the halo-mass task information beyond the ring.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from shards.manifest import load_manifest
from shards.simulate import physics as P
from shards.simulate import simulate
from shards.simulate.cli import plan, split_plan


def test_einstein_radius_of_1e12_msun_in_both_conventions():
    # DeepLenseSim's mass_to_radius (luminosity distances, D_ls = D_s - D_l) against angular-diameter distances.
    assert P.einstein_radius(1e12, 0.5, 1.0, "deeplense") == pytest.approx(1.2815, rel=0.005)
    assert P.einstein_radius(1e12, 0.5, 1.0, "angular") == pytest.approx(1.6645, rel=0.005)
    for preset in ("deeplense1", "deeplense2", "deeplense3"):
        replica = plan("substructure", 3, preset=preset, physics={"fidelity": "replica"})
        physical = plan("substructure", 3, preset=preset)
        assert P.draw_params(replica, 0)["einstein_radius"] == pytest.approx(1.2815, rel=0.005)
        assert P.draw_params(physical, 0)["einstein_radius"] == pytest.approx(1.6645, rel=0.005)


def test_replica_conventions_per_model():
    dl1, dl2, dl3 = (plan("substructure", 6, preset=f"deeplense{m}", physics={"fidelity": "replica"}) for m in (1, 2, 3))
    for config in (dl1, dl2, dl3):
        vortex = P.draw_params(config, 2)  # sample 2 is a vortex
        assert vortex["substructure_name"] == "vortex" and sum(vortex["subhalo_mass"]) == pytest.approx(3e10)
        # Subhalos use the same radius convention as the main lens.
        _, kwargs, _, _ = P.lenstronomy_kwargs(vortex)
        assert kwargs[2]["theta_E"] == pytest.approx(P.einstein_radius(3e8, 0.5, 1.0, "deeplense"))
    physical = plan("substructure", 6, preset="deeplense2")
    assert sum(P.draw_params(physical, 2)["subhalo_mass"]) == pytest.approx(1e10)
    # Model III: lenstronomy's WFC3/F160W PSF; Models II and III: the noise-free image, doubled.
    assert dl3.instrument.psf_fwhm == 0.08 and dl2.instrument.psf_fwhm == 0.16
    for config in (dl2, dl3):
        p = P.draw_params(config, 1)
        assert np.array_equal(P.render(config, p)[0], 2 * P.render_clean(config, p).astype(np.float32))
    # Model I: amp 20 source, counts from noise applied twice: integer counts, peak S/N about 9-14.
    p = P.draw_params(dl1, 0)
    _, _, _, source = P.lenstronomy_kwargs(p)
    assert source[0]["amp"] == pytest.approx(20.0)
    counts = P.render(dl1, p)[0]
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    clean, t = P.render_clean(dl1, p).max(), p["exposure"]
    peak_snr = t * clean / math.sqrt(2 * t * clean + (P.DEEPLENSE1_BACKGROUND_RMS * t) ** 2)
    assert 8 < peak_snr < 15, peak_snr


def test_replica_is_recorded_and_refused_on_realistic_presets(tmp_path):
    manifest = simulate("substructure", 6, tmp_path / "r", preset="deeplense2", physics={"fidelity": "replica"})
    scenario = load_manifest(tmp_path / "r").source["scenario"]
    assert manifest.source["scenario"]["fidelity"] == "replica" == scenario["fidelity"]
    assert scenario["theta_e_convention"] == "deeplense" and scenario["noise"] == "none"
    r = subprocess.run(
        [sys.executable, "-m", "shards", "simulate", "--task", "substructure", "--n", "3", "--preset", "euclid",
         "--fidelity", "replica", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "--fidelity" in r.stderr and "deeplense1" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", ["deeplense1", "deeplense2", "deeplense3"])
def test_replica_has_no_brightness_or_noise_shortcut_but_real_signal(preset):
    """The classes of a replica share the flux distribution and the noise; the substructure changes the image."""
    config = plan("substructure", 90, preset=preset, seed=7, physics={"fidelity": "replica"})
    flux, noise, change = {c: [] for c in config.classes}, {c: [] for c in config.classes}, {c: [] for c in config.classes}
    for i in range(90):
        p = P.draw_params(config, i)
        image = P.render(config, p)[0].astype(np.float64)
        clean = P.render_clean(config, p)
        smooth = P.render_clean(config, P.smooth_twin(p))
        scale = p["exposure"] if config.physics.noise == "deeplense1" else 2.0  # counts, or the doubled image
        residual = (image - scale * clean)[clean < 0.05 * clean.max()]
        cls = p["substructure_name"]
        flux[cls].append(image.sum())
        noise[cls].append(1.4826 * np.median(np.abs(residual - np.median(residual))))
        change[cls].append(np.abs(clean - smooth).sum() / smooth.sum())
    for cls in ("cdm", "vortex"):
        assert stats.ks_2samp(flux["no_sub"], flux[cls]).pvalue > 0.01, cls
        se = math.sqrt(np.var(flux["no_sub"]) / 30 + np.var(flux[cls]) / 30)
        assert abs(np.mean(flux[cls]) - np.mean(flux["no_sub"])) < 3 * se, cls
        if config.physics.noise == "none":
            assert max(noise[cls]) < 1e-6 and max(noise["no_sub"]) < 1e-6  # float32 rounding only
        else:
            assert stats.ks_2samp(noise["no_sub"], noise[cls]).pvalue > 0.01, cls
        assert np.median(change[cls]) > 0.01, cls  # the substructure moves at least 1% of the light
    assert max(change["no_sub"]) == 0


# ------------------------------------------------------------------------------------------ lens light
def test_lens_light_defaults_labels_and_image():
    halo = plan("halo_mass", 40, preset="euclid", seed=2)
    assert halo.physics.lens_light == "shmr"
    assert plan("substructure", 3, preset="euclid").physics.lens_light == "none"
    assert plan("halo_mass", 3, preset="deeplense2").physics.lens_light == "none"
    dark = plan("halo_mass", 40, preset="euclid", seed=2, physics={"lens_light": "none"})
    params = [P.draw_params(halo, i) for i in range(40)]
    for p in params:
        assert {"stellar_mass", "lens_mag", "lens_reff"} <= set(p)
        assert 0.01 < p["lens_reff"] < 3 and 15 < p["lens_mag"] < 32
    # The stellar mass follows the halo (Moster+2013 with 0.15 dex scatter).
    halo_mass = [p["halo_mass"] for p in params]
    assert np.corrcoef(halo_mass, [p["stellar_mass"] for p in params])[0, 1] > 0.8
    # The same lens with and without its light: only the light differs, and it sits at the centre.
    p_dark = P.draw_params(dark, 5)
    assert "lens_mag" not in p_dark
    with_light, without = P.render_clean(halo, params[5]), P.render_clean(dark, p_dark)
    centre = slice(28, 36)
    assert (with_light - without)[centre, centre].sum() > 0.3 * (with_light - without).sum() > 0


def test_moster_relation_matches_published_values():
    from shards.simulate.light import moster_stellar_fraction

    # Moster+2013 at z=0: the peak efficiency is ~3.5% near M_1 = 10^11.59 M_sun, and lower on both sides.
    peak = moster_stellar_fraction(11.59, 0.0)
    assert peak == pytest.approx(0.0351, rel=0.01)
    assert moster_stellar_fraction(11.0, 0.0) < peak and moster_stellar_fraction(12.5, 0.0) < peak


def test_lens_light_gives_the_halo_mass_headroom():
    """Ceiling (b), from the true theta_E, lens magnitude and size, beats ceiling (a), theta_E alone, by at
    least 0.08 in R^2 on held-out samples (gradient-boosted trees, as benchmarks/science.py --ceilings)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    n = 4000
    config = plan("halo_mass", n, preset="euclid", seed=1)
    params = [P.draw_params(config, i) for i in range(n)]
    split = np.asarray(split_plan(config, n, val=0.1, test=0.2)[0])
    y = np.asarray([p["halo_mass"] for p in params])
    theta = np.log10([p["einstein_radius"] for p in params])[:, None]
    both = np.c_[theta, [p["lens_mag"] for p in params], np.log10([p["lens_reff"] for p in params])]
    train, test = split == "train", split == "test"

    def r2(x):
        model = HistGradientBoostingRegressor(max_iter=150, random_state=0).fit(x[train], y[train])
        return 1 - np.mean((model.predict(x[test]) - y[test]) ** 2) / np.var(y[test])

    a, b = r2(theta), r2(both)
    assert b - a >= 0.08, (a, b)
