"""Resampling: bootstrap intervals and permutation p-values of correlations across artifacts, the paired
difference of two arms from their item-bootstrap replicates, and the Holm correction.

* :func:`correlation`: Pearson, Spearman and partial correlations (controlling for a third variable) with
  percentile bootstrap CIs (rows resampled with replacement; degenerate resamples with a constant variable are
  dropped) and two-sided permutation p-values ``(1 + #{|r_perm| >= |r_obs|}) / (n_perm + 1)``. All randomness
  comes from the generator the caller passes (``numpy.random.default_rng(seed)``): the same inputs and seed
  give the same numbers.
* :func:`paired_difference`: P_A - P_B with the interval, standard error and p of the table's paired item
  bootstrap (both arms resampled on the same items: realign.analysis.performance).
* :func:`holm`: Holm's step-down adjustment of a family of p-values.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from realign.analysis.performance import bootstrap_p, interval
from realign.analysis.settings import AnalysisSettings


def _pearson_rows(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of two (B, n) arrays; NaN where a row is constant."""
    Xc = X - X.mean(axis=1, keepdims=True)
    Yc = Y - Y.mean(axis=1, keepdims=True)
    num = (Xc * Yc).sum(axis=1)
    den = np.sqrt((Xc * Xc).sum(axis=1) * (Yc * Yc).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r[~(den > 1e-12 * np.maximum(1.0, np.abs(num)))] = np.nan
    return np.clip(r, -1.0, 1.0)


def _partial_rows(X, Y, Z) -> np.ndarray:
    rxy, rxz, ryz = _pearson_rows(X, Y), _pearson_rows(X, Z), _pearson_rows(Y, Z)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    r[~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _rank(A: np.ndarray) -> np.ndarray:
    return sps.rankdata(A, axis=-1)


def _ci(boot: np.ndarray, alpha: float) -> tuple[float | None, float | None, int]:
    ok = boot[np.isfinite(boot)]
    if ok.size < max(10, boot.size // 2):
        return None, None, int(ok.size)
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(ok.size)


def _perm_p(obs: float, perm: np.ndarray) -> float | None:
    if not math.isfinite(obs):
        return None
    perm = perm[np.isfinite(perm)]
    if perm.size == 0:
        return None
    return float((1 + np.sum(np.abs(perm) >= abs(obs) - 1e-12)) / (perm.size + 1))


def correlation(x: np.ndarray, y: np.ndarray, z: np.ndarray | None, method: str, settings: AnalysisSettings,
                rng: np.random.Generator) -> dict:
    """The ``method`` correlation (pearson, spearman, partial_pearson or partial_spearman; z is the control of
    the partial ones, None otherwise) of x with y, with its bootstrap CI at level 1 - alpha (settings.n_boot
    resamples of the rows) and its permutation p (settings.n_perm permutations of y). Draws the bootstrap, then
    the permutations, from ``rng``.

    Returns estimate, ci_low, ci_high (None when fewer than half the resamples, or 10, are defined), ci_level,
    p_perm, n, n_boot_valid."""
    alpha, n_boot, n_perm = settings.alpha, settings.n_boot, settings.n_perm
    n = len(x)
    rankit = method.endswith("spearman")
    partial = method.startswith("partial")

    def stat(X, Y, Z):
        if rankit:
            X, Y = _rank(X), _rank(Y)
            Z = _rank(Z) if Z is not None else None
        return _partial_rows(X, Y, Z) if partial else _pearson_rows(X, Y)

    x2, y2 = x[None, :], y[None, :]
    z2 = z[None, :] if z is not None else None
    est = float(stat(x2, y2, z2)[0])

    idx = rng.integers(0, n, size=(n_boot, n))
    boot = stat(x[idx], y[idx], z[idx] if z is not None else None)
    lo, hi, n_ok = _ci(boot, alpha)

    perm_idx = np.argsort(rng.random((n_perm, n)), axis=1)
    Xp = np.broadcast_to(x, (n_perm, n))
    Zp = np.broadcast_to(z, (n_perm, n)) if z is not None else None
    perm = stat(Xp, y[perm_idx], Zp)
    p = _perm_p(est, perm)
    return {
        "estimate": est,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": 1 - alpha,
        "p_perm": p,
        "n": n,
        "n_boot_valid": n_ok,
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_difference(a: pd.Series, b: pd.Series, alpha: float) -> dict:
    """P_A - P_B with its paired item-bootstrap interval, standard error and two-sided bootstrap p (the table's
    P_boot replicates: both arms resampled on the same items)."""
    diff = float(a["P"] - b["P"])
    replicates = np.asarray(a["P_boot"], float) - np.asarray(b["P_boot"], float)
    low, high = interval(replicates, alpha)
    se = float(np.std(replicates, ddof=1)) if replicates.size > 1 else math.nan
    p = bootstrap_p(replicates) if se > 0 else math.nan
    return {"diff_P": diff, "se": se, "ci_low": low, "ci_high": high, "p": p}
