"""Quantities of arms replicated over training seeds have two variance components: what the arms share (the evaluation
items, the damaged parent, the probe sequences) and what varies from seed to seed (training).

Every arm of a study is a set of training runs (seeds) of one recovery on one damaged parent. A quantity of an arm
(its gain, its delta CKA, its KL) is the mean over its seeds. Two sources of noise enter that mean:

* **shared** noise, common to every run evaluated on the same items: the sample of benchmark items, the damaged
  parent's own measurement (every gain subtracts it). The table's paired item bootstrap (every artifact resampled
  on the same items: realign.analysis.performance) measures it, *including its covariance between arms*;
* **seed** noise: training randomness (data order, init), plus the part of each run's evaluation noise that is
  its own (a run's item-by-model interaction).

With gains g_s = mu + u_s + c + i_s (u: seed effect; c: item noise shared by the arm's runs; i_s: item noise of
run s alone) the variance of the arm mean is Var(c) + (Var(u) + Var(i)) / S. The between-seed sample variance
s^2 estimates Var(u) + Var(i) exactly (the shared c cancels between runs), and the bootstrap covariance of two
distinct runs estimates Var(c) (their own i's are independent), so

    Var(mean) = mean_{s != s'} Cov_boot(g_s, g_s')  +  s^2 / S,

with nothing counted twice: the one-way random-effects (ANOVA) decomposition of a cluster mean (Searle, Casella &
McCulloch 1992, ch. 3), the clusters being seeds. Between two arms every pair of runs is distinct, so their shared
covariance is the plain bootstrap covariance of their means.

A linear combination then has variance V = V_shared + V_seed, and its interval is estimate +- sqrt(z^2 V_shared +
t^2 V_seed), each component at its own quantile: the shared part, measured by thousands of bootstrap replicates,
at the normal quantile z; the seed part, estimated from few seeds, at Student's t with its degrees of freedom (the
idea of the modified large-sample intervals, Graybill & Wang 1980). One t quantile for the whole variance would
understate it with two seeds: s^2 then has one degree of freedom and is often far below its expectation, and the
known shared part pushes a plug-in df up exactly when the variance is underestimated (simulated at e845fe7: the
single quantile covered 0.89-0.91, the split one 0.95-0.97).

The pre-registered test (realign.analysis.theta.paired) applies this decomposition to arms paired by
training seed, with one seed covariance pooled across damages; this module keeps the quantile
helpers both use.
"""

from __future__ import annotations

import math

from scipy import special
from scipy.optimize import brentq

MIN_SEEDS = 2  # issue 16, "Replicates": every arm entering theta or a contrast runs with at least two seeds


def t_quantile(q: float, df: float) -> float:
    # scipy.special's quantiles: the calibration simulation calls this thousands of times
    return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))


def _halfwidth(q: float, var_shared: float, var_seed: float, df: float) -> float:
    z, t = t_quantile(q, math.inf), t_quantile(q, df)
    return math.sqrt(max(z * z * var_shared + (t * t * var_seed if var_seed > 0 else 0.0), 0.0))


def one_sided_p(estimate: float, var_shared: float, var_seed: float, df: float) -> float:
    """The smallest one-sided level q at which estimate - halfwidth(q) >= 0 (halfwidth at quantile 1 - q with
    each variance component at its own quantile); symmetric: p(-x) = 1 - p(x)."""
    if not (math.isfinite(estimate) and math.isfinite(var_shared) and math.isfinite(var_seed)):
        return math.nan
    if var_shared + var_seed <= 0:  # no noise at all: the sign decides
        return 0.0 if estimate > 0 else 1.0
    if estimate <= 0:
        return 1.0 - one_sided_p(-estimate, var_shared, var_seed, df) if estimate < 0 else 0.5

    def excess(q: float) -> float:  # increasing in q: the quantiles fall as q rises to 1/2
        return estimate - _halfwidth(1 - q, var_shared, var_seed, df)

    smallest = 1e-15
    if excess(smallest) >= 0:
        return smallest
    return float(brentq(excess, smallest, 0.5, xtol=1e-12))
