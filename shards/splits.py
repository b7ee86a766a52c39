"""Deterministic, stratified train/val/test splits."""

from __future__ import annotations

import numpy as np


def stratified_split(
    strata: np.ndarray,
    *,
    val: float,
    test: float,
    seed: int,
    regression: bool = False,
    n_bins: int = 10,
) -> np.ndarray:
    """Assign each sample to ``train``/``val``/``test``, stratified by ``strata``.

    ``strata`` holds class labels, or continuous targets when ``regression`` is set; those are
    binned by quantiles first. Each stratum is shuffled with a generator seeded by ``seed`` and cut
    in the requested fractions, so the result depends only on the inputs.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val ({val}) and test ({test}) must be fractions in [0, 1) summing below 1")
    strata = np.asarray(strata)
    n = len(strata)
    if regression:
        edges = np.quantile(strata.astype(np.float64), np.linspace(0, 1, n_bins + 1)[1:-1])
        strata = np.searchsorted(edges, strata.astype(np.float64), side="right")
    out = np.empty(n, dtype=object)
    rng = np.random.default_rng(seed)
    # Fractional remainders carried across strata keep the overall split close to the request.
    carry_val = carry_test = 0.0
    for value in sorted(set(strata.tolist()), key=str):
        idx = np.flatnonzero(strata == value)
        idx = idx[rng.permutation(len(idx))]
        want_val = len(idx) * val + carry_val
        want_test = len(idx) * test + carry_test
        n_val, n_test = int(round(want_val)), int(round(want_test))
        n_val = min(n_val, len(idx))
        n_test = min(n_test, len(idx) - n_val)
        carry_val, carry_test = want_val - n_val, want_test - n_test
        out[idx[:n_val]] = "val"
        out[idx[n_val : n_val + n_test]] = "test"
        out[idx[n_val + n_test :]] = "train"
    return out.astype(str)
