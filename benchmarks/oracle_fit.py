"""A fitted smooth-model oracle for the substructure difficulty ladder.

The true-smooth oracle (``benchmarks/science.py::oracle_ladder``) scores an image by its reduced chi^2
against the sample's own smooth lens. On the presets where the substructure mass is *added* on top of the
main lens, that smooth lens is too light, and much of the separation is a ring-size cue that a smooth model
could absorb. This oracle is the fair upper bound: per image it *fits* a smooth model (SIE + external shear +
elliptical Sersic source, no lens light) to the observed image, in the simulator's e-/s units before any
``scaling: max``, and scores the image by its reduced chi^2 against the best fit.

The fit (:func:`fit_smooth`):

* 13 non-linear parameters: SIE log theta_E, e1, e2, centre; shear gamma1, gamma2 (its origin tied to the
  lens centre, as the simulator does); Sersic log R, log n, e1, e2, centre. The source amplitude is solved
  linearly at every evaluation (weighted least squares), so it never enters the non-linear search.
* It starts from the sample's true smooth parameters (``physics.smooth_twin``, the source amplitude left
  free), which an upper-bound oracle may know; from there scipy's Levenberg-Marquardt moves every parameter
  freely, without bounds (the positive ones through their logarithm). ``--starts 2`` adds a start moved
  from the truth by a random step (:data:`PERTURBATION`) and keeps the lower chi^2: a check that the fit
  started at the truth is not caught in a local minimum.
* Noise: round one weights the pixels with ``physics.noise_sigma`` of the observed image itself; round two,
  started from round one's optimum, with ``noise_sigma`` of the fitted model. The reported chi^2 uses the
  fitted model's sigma, so nothing about the truth enters the score but the starting point and the known
  exposure and instrument.
* The score is chi^2 / (pixels - 14), 14 being the fitted parameters with the amplitude.

Run it (writes ``benchmarks/results/oracle_fitted.json`` and ``oracle_true.json``, the true-smooth oracle of
the same images, and ``oracle_fitted.md``)::

    python benchmarks/oracle_fit.py --per-class 200 --workers 2
    python benchmarks/oracle_fit.py --per-class 200 --rung deeplense1=100   # fewer images on one rung
    python benchmarks/oracle_fit.py --per-class 50 --starts 2 --out benchmarks/results/starts2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # one thread per worker process; set before numpy loads
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from shards.simulate import physics as P  # noqa: E402
from shards.simulate.cli import plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEED = 7  # the true-smooth oracle's seed: the same images
LENS_MODELS, SOURCE_MODELS = ["SIE", "SHEAR"], ["SERSIC_ELLIPSE"]
N_FITTED = 14  # 13 non-linear parameters and the linear source amplitude
MAX_NFEV = 400  # per round; a round that reaches it keeps its best point so far
STARTS = 1  # the true smooth parameters; --starts 2 adds a perturbed start (a check of local minima)
# The perturbed start's step, uniform in +-this on each fit coordinate (see _to_vector): log theta_E, lens e1,
# e2, centre ("), shear gamma1, gamma2, source log R, log n, e1, e2, centre (").
PERTURBATION = np.array([0.05, 0.05, 0.05, 0.05, 0.05, 0.03, 0.03, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])


def _method(starts: int) -> str:
    begin = (
        "from the true smooth parameters"
        if starts == 1
        else f"from {starts} starts, the true smooth parameters and {starts - 1} perturbed copies, keeping the "
        "lower chi^2"
    )
    return (
        "SIE + shear + Sersic source fitted by scipy least_squares (Levenberg-Marquardt, 13 non-linear "
        f"parameters, source amplitude solved linearly) {begin}; two rounds per start: pixels weighted by the "
        "noise sigma of the data, then of the round-one fit; chi^2 with the fitted model's noise sigma, divided "
        "by (pixels - 14)"
    )


# --------------------------------------------------------------------------------------------- the fit
def _to_vector(params: dict) -> np.ndarray:
    """The non-linear parameters of a sample's smooth lens and source, in the fit's coordinates."""
    return np.array(
        [
            math.log(params["sie_einstein_radius"]),
            params["lens_e1"],
            params["lens_e2"],
            params["lens_x"],
            params["lens_y"],
            params["gamma1"],
            params["gamma2"],
            math.log(params["source_radius"]),
            math.log(params["source_index"]),
            params["source_e1"],
            params["source_e2"],
            params["source_x"],
            params["source_y"],
        ]
    )


def _kwargs(x: np.ndarray) -> tuple[list[dict], list[dict]]:
    """lenstronomy keyword arguments of the smooth model at ``x``, the source with unit amplitude."""
    lx, ly = float(x[3]), float(x[4])
    kwargs_lens = [
        {"theta_E": math.exp(x[0]), "e1": float(x[1]), "e2": float(x[2]), "center_x": lx, "center_y": ly},
        {"gamma1": float(x[5]), "gamma2": float(x[6]), "ra_0": lx, "dec_0": ly},
    ]
    kwargs_source = [
        {
            "amp": 1.0,
            "R_sersic": math.exp(x[7]),
            "n_sersic": math.exp(x[8]),
            "e1": float(x[9]),
            "e2": float(x[10]),
            "center_x": float(x[11]),
            "center_y": float(x[12]),
        }
    ]
    return kwargs_lens, kwargs_source


@dataclass
class SmoothFit:
    chi2: float  # reduced: chi^2 / (pixels - 14), sigma from the fitted model
    x: np.ndarray  # the fitted non-linear parameters (fit coordinates)
    amp: float  # the fitted source amplitude (lenstronomy's SERSIC_ELLIPSE amp)
    model: np.ndarray  # the fitted noise-free image, e-/s per pixel
    evaluations: int  # model images rendered, both rounds (Jacobians included)
    converged: bool  # both rounds ended on a convergence criterion, not on MAX_NFEV


class _Objective:
    """Whitened residuals of the data against the smooth model at x, with the amplitude solved linearly."""

    def __init__(self, instrument, data: np.ndarray, sigma: np.ndarray):
        self.model = P.image_model(instrument, LENS_MODELS, SOURCE_MODELS)
        self.data, self.weight = data.ravel(), 1.0 / sigma.ravel()
        self.calls = 0

    def template(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        kwargs_lens, kwargs_source = _kwargs(x)
        return self.model.image(kwargs_lens=kwargs_lens, kwargs_source=kwargs_source).ravel()

    def solve(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t = self.template(x) * self.weight
        if not np.all(np.isfinite(t)):
            return t, math.nan
        denom = float(t @ t)
        return t, (float(t @ (self.data * self.weight)) / denom if denom > 0 else 0.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t, amp = self.solve(x)
        if not math.isfinite(amp):  # a step into an unphysical corner: a large, finite residual
            return np.full_like(self.data, 1e3)
        return self.data * self.weight - amp * t


def fit_smooth(
    config: P.SimConfig, params: dict, data: np.ndarray, start: np.ndarray | None = None
) -> SmoothFit:
    """Fit SIE + shear + Sersic to ``data`` (H, W) in e-/s per pixel from one start; see the module docstring.

    ``start`` (fit coordinates, see :func:`_to_vector`) defaults to the sample's true smooth parameters.
    ``params`` gives the exposure (and, by default, the start)."""
    from scipy.optimize import least_squares

    inst, exposure = config.instrument, params["exposure"]
    data = np.asarray(data, dtype=np.float64)
    x = _to_vector(P.smooth_twin(params)) if start is None else np.asarray(start, dtype=np.float64)
    sigma = P.noise_sigma(data, inst, exposure)  # round one: the noise of the data as observed
    evaluations, converged = 0, True
    for _ in range(2):
        objective = _Objective(inst, data, sigma)
        result = least_squares(objective, x, method="lm", x_scale="jac", diff_step=1e-4, max_nfev=MAX_NFEV)
        x, converged = result.x, converged and result.status > 0
        evaluations += objective.calls
        t, amp = objective.solve(x)
        model = amp * t / objective.weight
        sigma = P.noise_sigma(model.reshape(data.shape), inst, exposure)  # round two: the fitted model's
    chi2 = float(np.sum(((data.ravel() - model) / sigma.ravel()) ** 2)) / (data.size - N_FITTED)
    return SmoothFit(chi2, x, amp, model.reshape(data.shape), evaluations, converged)


def perturbed_start(params: dict, rng: np.random.Generator) -> np.ndarray:
    """The true smooth parameters moved by a random step of :data:`PERTURBATION` (uniform in +-1 each)."""
    return _to_vector(P.smooth_twin(params)) + PERTURBATION * rng.uniform(-1, 1, PERTURBATION.size)


def best_smooth_fit(
    config: P.SimConfig, params: dict, data: np.ndarray, starts: int = STARTS
) -> tuple[SmoothFit, list[float]]:
    """The lowest-chi^2 fit of ``starts`` starts: the true smooth parameters, then perturbed ones (seeded by
    the sample's seed and index). Returns the best fit and every start's reduced chi^2."""
    rng = np.random.default_rng([config.seed, config.task_code, params["index"], 17])
    fits = [fit_smooth(config, params, data)]
    fits += [fit_smooth(config, params, data, perturbed_start(params, rng)) for _ in range(starts - 1)]
    best = min(range(len(fits)), key=lambda k: fits[k].chi2 if math.isfinite(fits[k].chi2) else math.inf)
    fits[best].evaluations = sum(f.evaluations for f in fits)
    return fits[best], [f.chi2 for f in fits]


def true_smooth_chi2(config: P.SimConfig, params: dict, data: np.ndarray) -> float:
    """The true-smooth oracle's score, exactly as ``oracle_ladder``: mean chi^2 against the smooth twin."""
    smooth = P.render_clean(config, P.smooth_twin(params))
    sigma = P.noise_sigma(smooth, config.instrument, params["exposure"])
    return float(np.mean(((data - smooth) / sigma) ** 2))


# --------------------------------------------------------------------------------------------- the ladder
def _default_rungs() -> dict:
    from benchmarks.science import RUNGS

    return RUNGS


def _auc(pos, neg) -> float:
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def _auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC from its value and the class sizes (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _score(task: tuple) -> dict:
    """One image of one rung: both oracles' chi^2 and the fit's CPU time (runs in a worker process)."""
    preset, knobs, n, index, starts = task
    config = plan("substructure", n, preset=preset, physics=knobs, seed=SEED)
    params = P.draw_params(config, index)
    data = P.render(config, params)[0].astype(np.float64)  # e-/s, before any scaling: max
    cpu = time.process_time()
    fit, per_start = best_smooth_fit(config, params, data, starts)
    cpu = time.process_time() - cpu
    return {
        "class": params["substructure_name"],
        "fitted": fit.chi2,
        "true": true_smooth_chi2(config, params, data.astype(np.float32)),
        "cpu_s": cpu,
        "evaluations": fit.evaluations,
        "converged": fit.converged,
        # a perturbed start found a fit better by more than 1% than the one started at the truth
        "perturbed_won": fit.chi2 < 0.99 * per_start[0],
    }


def _rows(rung: str, per_class: int, scores: list[dict], starts: int) -> tuple[dict, dict]:
    chi2 = {
        k: {c: [s[k] for s in scores if s["class"] == c] for c in ("no_sub", "cdm", "vortex")}
        for k in ("fitted", "true")
    }
    rows = []
    for k in ("fitted", "true"):
        auc = {c: _auc(chi2[k][c], chi2[k]["no_sub"]) for c in ("cdm", "vortex")}
        rows.append(
            {
                "rung": rung,
                **auc,
                "median_chi2": {c: float(np.median(v)) for c, v in chi2[k].items()},
                "per_class": per_class,
                "auc_se": {c: _auc_se(a, len(chi2[k][c]), len(chi2[k]["no_sub"])) for c, a in auc.items()},
                # every image's reduced chi^2 (6 significant digits), in index order within its class
                "chi2": {c: [float(f"{x:.6g}") for x in v] for c, v in chi2[k].items()},
            }
        )
    rows[0]["fit"] = {
        "method": _method(starts),
        "start": "true smooth parameters" + (f" and {starts - 1} perturbed" if starts > 1 else ""),
        "sigma": "fitted model",
        "cpu_s_per_fit": float(np.mean([s["cpu_s"] for s in scores])),
        "starts": starts,
        "evaluations_median": float(np.median([s["evaluations"] for s in scores])),
        "perturbed_start_better_by_1pc": int(sum(s["perturbed_won"] for s in scores)),
        "not_converged": int(sum(not s["converged"] for s in scores)),
        "fits": len(scores),
    }
    return rows[0], rows[1]


def ladder(
    per_class: int | dict[str, int],
    rungs: dict | None = None,
    workers: int = 1,
    on_rung=None,
    starts: int = STARTS,
) -> tuple[list[dict], list[dict]]:
    """Fitted and true-smooth oracle rows per rung, on the same images: seed 7, the first ``3 * per_class``
    samples of the substructure task (no_sub, cdm, vortex in turn), as ``oracle_ladder``. ``per_class`` may
    map a rung to its own count (0 skips it); ``on_rung(fitted_rows, true_rows)`` is called after each."""
    rungs = _default_rungs() if rungs is None else rungs
    fitted, true = [], []
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        for rung, (preset, knobs) in rungs.items():
            n = per_class.get(rung, 0) if isinstance(per_class, dict) else per_class
            if n <= 0:
                continue
            tasks = [(preset, knobs, 3 * n, i, starts) for i in range(3 * n)]
            scores = pool.map(_score, tasks, chunksize=4) if pool else [_score(t) for t in tasks]
            f, t = _rows(rung, n, scores, starts)
            fitted.append(f)
            true.append(t)
            print(
                f"[oracle_fit] {rung}: fitted cdm {f['cdm']:.3f} vortex {f['vortex']:.3f} | true-smooth cdm "
                f"{t['cdm']:.3f} vortex {t['vortex']:.3f} | {f['fit']['cpu_s_per_fit']:.2f} CPU s/fit",
                flush=True,
            )
            if on_rung:
                on_rung(fitted, true)
    finally:
        if pool:
            pool.close()
            pool.join()
    return fitted, true


def fitted_oracle_ladder(
    per_class: int, rungs: dict | None = None, workers: int = 1, starts: int = STARTS
) -> list[dict]:
    """The fitted-oracle rows per rung (``rung``, ``cdm``, ``vortex``, ``median_chi2``, ``per_class``,
    ``fit``): AUC of the reduced chi^2 against each image's best-fitting smooth model."""
    return ladder(per_class, rungs, workers, starts=starts)[0]


def _auc_cell(row: dict, cls: str) -> str:
    se = row.get("auc_se", {}).get(cls)
    return f"{row[cls]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _medians(row: dict) -> str:
    m = row["median_chi2"]
    return f"{m['no_sub']:.3f} / {m['cdm']:.3f} / {m['vortex']:.3f}"


def render_fitted_oracle(rows: list[dict], true_rows: list[dict]) -> list[str]:
    """A markdown table: per rung, the fitted oracle's AUCs beside the true-smooth oracle's."""
    if not rows:
        return []
    true = {r["rung"]: r for r in true_rows if "rung" in r}
    lines = [
        "### Oracle detectability by rung: fitted smooth model vs true smooth lens (no training)",
        "",
        "AUC (± its standard error, Hanley & McNeil) of each image's reduced chi^2, as the score of cdm (or "
        "vortex) against no_sub, seed 7. *Fitted*: "
        "against the best-fitting smooth model: " + rows[0]["fit"]["method"] + ". *True*: "
        "against the sample's own smooth lens (true main lens and source, no substructure), which on the "
        "DeepLense presets also lacks the substructure's added mass.",
        "",
        "| rung | images per class | cdm: fitted / true | vortex: fitted / true "
        "| median chi^2 fitted: no_sub / cdm / vortex | median chi^2 true: no_sub / cdm / vortex "
        "| CPU s per fit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = true.get(r["rung"])
        pair = {c: f"{_auc_cell(r, c)} / " + (_auc_cell(t, c) if t else "-") for c in ("cdm", "vortex")}
        lines.append(
            f"| {r['rung']} | {r['per_class']} | {pair['cdm']} | {pair['vortex']} "
            f"| {_medians(r)} | {_medians(t) if t else '-'} | {r['fit']['cpu_s_per_fit']:.2f} |"
        )
    return [*lines, ""]


# --------------------------------------------------------------------------------------------- command line
def _load_rows(path: Path) -> list[dict]:
    """Rows of an earlier run (an absent file: none); a file that is not a list of rung rows is an error."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and isinstance(r.get("rung"), str) for r in rows
    ):
        raise ValueError(f"{path}: expected a list of rows, each with a 'rung'")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--per-class", type=int, default=200, help="test images per class on each rung (default 200)"
    )
    p.add_argument(
        "--rung",
        action="append",
        default=[],
        metavar="NAME=N",
        help="images per class on one rung (0 skips it); repeatable",
    )
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument(
        "--starts",
        type=int,
        default=STARTS,
        help=f"fit starts per image: the truth, then perturbed ones (default {STARTS})",
    )
    p.add_argument(
        "--keep-other-rungs",
        action="store_true",
        help="keep the rows of the rungs this call does not measure from the result files already in --out",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="result folder (default benchmarks/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rungs = _default_rungs()
    counts = dict.fromkeys(rungs, args.per_class)
    for item in args.rung:
        name, _, n = item.rpartition("=")
        if name not in rungs or not n.isdigit():
            print(
                f"error: --rung {item!r}: expected NAME=N with NAME one of: {', '.join(rungs)}",
                file=sys.stderr,
            )
            return 2
        counts[name] = int(n)
    if args.per_class < 0 or args.workers < 1 or args.starts < 1:
        print("error: --per-class must be >= 0, --workers and --starts >= 1", file=sys.stderr)
        return 2
    kept: tuple[list[dict], list[dict]] = ([], [])
    if args.keep_other_rungs:
        try:
            kept = (_load_rows(args.out / "oracle_fitted.json"), _load_rows(args.out / "oracle_true.json"))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/oracle_fit.py", *(sys.argv[1:] if argv is None else argv)])
    order = list(rungs)

    def merged(new: list[dict], old: list[dict]) -> list[dict]:
        done = {r["rung"] for r in new}
        rows = [*new, *(r for r in old if r["rung"] not in done)]
        return sorted(rows, key=lambda r: order.index(r["rung"]) if r["rung"] in order else len(order))

    def write(fitted: list[dict], true: list[dict]) -> None:
        for r in fitted:
            r.setdefault("command", command)
        fitted, true = merged(fitted, kept[0]), merged(true, kept[1])
        (args.out / "oracle_fitted.json").write_text(json.dumps(fitted, indent=1) + "\n")
        (args.out / "oracle_true.json").write_text(json.dumps(true, indent=1) + "\n")
        commands = list(dict.fromkeys(r.get("command", "?") for r in fitted))
        text = "\n".join([*render_fitted_oracle(fitted, true), *(f"Command: `{c}`" for c in commands), ""])
        (args.out / "oracle_fitted.md").write_text(text)

    wall = time.perf_counter()
    ladder(counts, rungs, args.workers, on_rung=write, starts=args.starts)
    print(f"[oracle_fit] wrote {args.out} in {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
