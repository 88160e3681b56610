"""Pooling per-damage estimates with a random effect per damage: DerSimonian-Laird with the Hartung-Knapp-Sidik-
Jonkman variance and t reference.

Model: estimate_d = theta + delta_d + e_d, delta_d ~ (0, tau^2) the damage's own effect (each damaged parent is
one draw of a damage: its own recipe, its own sample of what was broken), e_d its estimation error with variance
v_d. The pooled theta is the mean of the damages' distribution.

* tau^2: DerSimonian & Laird (1986), the method-of-moments estimator from Cochran's Q, truncated at 0.
* The variance of the pooled mean and its reference: Hartung & Knapp (2001), Sidik & Jonkman (2002): the weighted
  residual dispersion q = sum w*_d (theta_d - theta_RE)^2 / (k - 1) scales the variance, and the reference is
  t with k - 1 degrees of freedom. With the few damages of a study (k = 2-3) the plain DL Wald interval covers far
  below nominal, while HKSJ holds close to it (IntHout, Ioannidis & Borm 2014). The scale is taken as max(1, q)
  (the "ad hoc" modification: Knapp & Hartung 2003; Roever, Knapp & Friede 2015): with three damages that agree
  by chance q can fall well below 1, and plain HKSJ would then be narrower than the DL interval itself.
* REML was not chosen: with k = 3 its tau^2 is as poorly determined as DL's, it needs iteration that can stall at
  the boundary, and the interval's validity at small k comes from the HKSJ step, not from the tau^2 estimator.
* Correlated errors: the damages share the evaluation items (one joint item bootstrap for the whole table), so
  the e_d can correlate. DL assumes they do not; when the caller passes the measured covariance of the e_d, the
  variance of the weighted mean is w' (Sigma + tau^2 I) w / (sum w)^2 with Sigma's off-diagonal from it (a
  sandwich: the weights stay DL's), then scaled by max(1, q). Without a covariance it is exactly HKSJ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from realign.analysis.components import t_quantile


@dataclass(frozen=True)
class Pooled:
    """The pooled estimate over k estimates, its 1 - alpha interval, and the parts it came from: tau2 (between-
    damage variance, DL), q (the HKSJ dispersion before the max(1, q) floor), cochran_q, var (of the pooled
    mean), df (k - 1; inf for k = 1, where the one estimate's own interval is not recomputed here), weights
    (normalised random-effects weights), method."""
    estimate: float
    low: float
    high: float
    k: int
    tau2: float
    q: float
    cochran_q: float
    var: float
    df: float
    weights: tuple[float, ...]
    method: str


def random_effects(estimates, variances, alpha: float, covariance: np.ndarray | None = None) -> Pooled:
    """DerSimonian-Laird pooling with the HKSJ interval (module docstring). `variances` are the v_d;
    `covariance` (optional, [k, k]) the covariance of the estimation errors, of which only the off-diagonal is
    used (the diagonal is `variances`). Needs k >= 2 finite estimates with positive variances."""
    y = np.asarray(estimates, float)
    v = np.asarray(variances, float)
    k = y.size
    if k < 2 or not (np.isfinite(y).all() and np.isfinite(v).all() and (v > 0).all()):
        raise ValueError(f"random_effects: needs >= 2 finite estimates with positive variances, got {y}, {v}")
    w = 1 / v
    fixed = float(w @ y / w.sum())
    cochran_q = float(w @ (y - fixed) ** 2)
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (cochran_q - (k - 1)) / c)
    ws = 1 / (v + tau2)
    pooled = float(ws @ y / ws.sum())
    q = float(ws @ (y - pooled) ** 2 / (k - 1))
    sigma = np.diag(v + tau2)
    if covariance is not None:
        off = np.asarray(covariance, float).copy()
        np.fill_diagonal(off, 0.0)
        sigma = sigma + off
    var = float(ws @ sigma @ ws / ws.sum() ** 2) * max(1.0, q)
    half = t_quantile(1 - alpha / 2, k - 1) * math.sqrt(var)
    method = "DerSimonian-Laird, HKSJ variance (max(1, q)) and t(k-1)"
    if covariance is not None:
        method += ", with the measured covariance of the damages' errors"
    return Pooled(pooled, pooled - half, pooled + half, k, tau2, q, cochran_q, var, float(k - 1),
                  tuple(float(x) for x in ws / ws.sum()), method)
