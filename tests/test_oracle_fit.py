"""The fitted smooth-model oracle (benchmarks/oracle_fit.py): its fit recovers smooth lenses and removes the
ring-size cue that the true-smooth oracle keeps, on real simulated deeplense2 images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import oracle_fit as O
from shards.simulate import physics as P
from shards.simulate.cli import plan

# seed 7 as the ladder; classes in turn: 0, 3 no_sub; 1, 4 cdm; 2, 5 vortex
CONFIG = plan("substructure", 6, preset="deeplense2", seed=O.SEED)


def _sample(index: int) -> tuple[dict, np.ndarray]:
    params = P.draw_params(CONFIG, index)
    return params, P.render(CONFIG, params)[0].astype(np.float64)


@pytest.mark.parametrize("index", [0, 3])
def test_fit_of_a_smooth_lens_has_chi2_near_one(index):
    params, data = _sample(index)
    assert params["substructure_name"] == "no_sub"
    fit = O.fit_smooth(CONFIG, params, data)
    assert fit.converged
    assert 0.8 < fit.chi2 < 1.3, fit.chi2
    # the fitted image is the lensed source: its flux matches the noise-free truth to within the noise
    clean = P.render_clean(CONFIG, params)
    assert abs(fit.model.sum() - clean.sum()) < 0.02 * clean.sum()


@pytest.mark.parametrize("index", [1, 2, 4, 5])
def test_fit_removes_the_ring_size_cue(index):
    params, data = _sample(index)
    assert params["substructure_name"] in ("cdm", "vortex")
    true_chi2 = O.true_smooth_chi2(CONFIG, params, data.astype(np.float32))
    assert true_chi2 > 3.0, true_chi2  # the added mass makes the true smooth lens a poor match
    fit = O.fit_smooth(CONFIG, params, data)
    assert fit.chi2 < 0.7 * true_chi2, (fit.chi2, true_chi2)
    # the added substructure mass shows up as a larger fitted Einstein radius than the smooth lens's own
    assert np.exp(fit.x[0]) > params["sie_einstein_radius"] * 1.002


def test_a_perturbed_start_finds_the_same_fit():
    params, data = _sample(2)
    from_truth = O.fit_smooth(CONFIG, params, data)
    signs = np.where(np.arange(O.PERTURBATION.size) % 2 == 0, 1.0, -1.0)
    start = O._to_vector(P.smooth_twin(params)) + 0.8 * O.PERTURBATION * signs  # every parameter off
    assert abs(start[0] - from_truth.x[0]) > 0.02  # theta_E visibly off from where the fit ends
    moved = O.fit_smooth(CONFIG, params, data, start)
    assert moved.chi2 == pytest.approx(from_truth.chi2, rel=0.01)
    assert np.exp(moved.x[0]) == pytest.approx(np.exp(from_truth.x[0]), rel=2e-3)
    random_start = O.perturbed_start(params, np.random.default_rng(0))
    assert np.all(np.abs(random_start - O._to_vector(P.smooth_twin(params))) <= O.PERTURBATION)
    best, per_start = O.best_smooth_fit(CONFIG, params, data, starts=2)
    assert len(per_start) == 2 and best.chi2 == min(per_start)


def test_ladder_rows_and_table():
    rungs = {"deeplense2": ("deeplense2", {})}
    fitted, true = O.ladder(2, rungs, starts=1)
    (f,), (t,) = fitted, true
    assert f["rung"] == t["rung"] == "deeplense2" and f["per_class"] == 2
    assert f["median_chi2"]["no_sub"] < 1.3 and f["median_chi2"]["vortex"] < t["median_chi2"]["vortex"]
    assert t["cdm"] == t["vortex"] == 1.0  # on two images per class the true-smooth oracle separates all
    assert f["fit"]["fits"] == 6 and f["fit"]["cpu_s_per_fit"] > 0 and f["fit"]["sigma"] == "fitted model"
    table = O.render_fitted_oracle(fitted, true)
    row = next(line for line in table if line.startswith("| deeplense2 |"))
    assert f"{f['cdm']:.3f} ± {f['auc_se']['cdm']:.3f} / {t['cdm']:.3f} ± 0.000" in row
    assert f"{f['vortex']:.3f} ± {f['auc_se']['vortex']:.3f} / {t['vortex']:.3f}" in row
    assert sorted(f["chi2"]) == ["cdm", "no_sub", "vortex"] and len(f["chi2"]["vortex"]) == 2
    assert O._auc(f["chi2"]["vortex"], f["chi2"]["no_sub"]) == f["vortex"]  # the AUC can be recomputed


def test_auc_standard_error():
    assert O._auc_se(1.0, 200, 200) == 0.0
    assert 0.015 < O._auc_se(0.8, 200, 200) < 0.03  # about sqrt(A(1-A)/n) for equal classes
    assert O._auc_se(0.8, 50, 50) > O._auc_se(0.8, 200, 200)


def test_unknown_rung_is_a_clear_error(capsys, tmp_path):
    assert O.main(["--rung", "nowhere=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--rung 'nowhere=3'" in err and "deeplense2" in err
    assert not list(tmp_path.iterdir())


def test_keep_other_rungs_merges_and_names_a_corrupt_file(tmp_path, capsys):
    other = {"rung": "euclid (realistic)", "cdm": 0.5, "vortex": 0.5, "per_class": 9, "command": "earlier"}
    (tmp_path / "oracle_fitted.json").write_text(json.dumps([{**other, "median_chi2": MEDIANS, "fit": FIT}]))
    (tmp_path / "oracle_true.json").write_text(json.dumps([{**other, "median_chi2": MEDIANS}]))
    args = ["--per-class", "0", "--rung", "deeplense2=1", "--starts", "1", "--out", str(tmp_path)]
    assert O.main([*args, "--keep-other-rungs"]) == 0
    fitted = json.loads((tmp_path / "oracle_fitted.json").read_text())
    assert [r["rung"] for r in fitted] == ["deeplense2", "euclid (realistic)"]  # in the ladder's order
    assert fitted[0]["per_class"] == 1 and "--rung deeplense2=1" in fitted[0]["command"]
    md = (tmp_path / "oracle_fitted.md").read_text()
    assert "Command: `earlier`" in md and "| euclid (realistic) | 9 |" in md
    (tmp_path / "oracle_true.json").write_text("[{")
    assert O.main([*args, "--keep-other-rungs"]) == 1
    assert "oracle_true.json: not readable JSON" in capsys.readouterr().err
    assert (tmp_path / "oracle_true.json").read_text() == "[{"  # left as it was


MEDIANS = {"no_sub": 1.0, "cdm": 1.0, "vortex": 1.0}
FIT = {"method": "m", "cpu_s_per_fit": 0.1}
