"""Means of arms replicated over training seeds, with two variance components: what the arms share (the evaluation
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

A linear combination of arm means then has variance V = V_shared + V_seed, V_seed = sum_a c_a^2 s_a^2 / S_a,
and its 1 - alpha interval is

    estimate +- sqrt(z^2 V_shared + t_nu^2 V_seed),   nu = V_seed^2 / sum_a (c_a^2 s_a^2 / S_a)^2 / (S_a - 1),

each component at its own quantile: the shared part, measured by thousands of bootstrap replicates, at the normal
quantile z; the seed part, estimated from S_a - 1 degrees of freedom per arm, at Student's t with Satterthwaite's
degrees of freedom of the seed terms alone (Satterthwaite 1946; Welch 1947). Pure seed noise gives exactly the
Welch interval; pure item noise the bootstrap's normal interval; a mixture is at least as wide as either part's.
(Each component at its own quantile is the idea of the modified large-sample intervals, Graybill & Wang 1980.)

Why not one t quantile with Satterthwaite's df of the whole variance: with two seeds, s^2 has one degree of
freedom and is often far below its expectation (P(chi2_1 < 0.1) = 0.25); the known shared part then pushes the
plug-in df up and the t quantile down exactly when the variance is underestimated. Simulated (2 seeds per arm,
200 items, 600 tables each, theta = 0.75; item noise per run 0.1 / item, seed sd 0, 0.01, 0.02, 0.04): the single
quantile covered 0.91, 0.91, 0.89, 0.90; this interval 0.97, 0.97, 0.97, 0.95 (and 0.95 with seed noise only).

With two seeds per arm nu lies between 1 and 2 when one arm dominates: the interval is then wide, and it is not
too narrow. When two arms have equal seed counts n, the Welch statistic equals the pooled-variance t statistic,
which has exactly 2n - 2 degrees of freedom under equal seed variances; Satterthwaite's nu never exceeds that, so
the seed part is at least as wide as the exact interval there (and close to nominal under unequal variances:
Best & Rayner 1987). The price: when seeds hardly differ, s^2 (which holds each run's own item noise too) still
carries t_nu, and the interval is wider than an oracle's.

A ratio of two arm means (theta, an arm's recovery relative to kd) gets Fieller's interval (Fieller 1954): the set
of R for which mean_a - R mean_b is not rejected at level alpha, with its variance from the components above;
unbounded when the denominator is not distinguishable from 0 (no ratio can then be pinned down).

Where a quantity has no replicates (delta CKA and KL in the table carry only a per-artifact interval or
standard error), the shared term of an arm is bounded above by the mean squared standard error of its runs
(Cauchy-Schwarz: a covariance is at most the geometric mean of the variances) and the covariance between arms
is set to 0: both overstate the variance of a difference of positively correlated arms, i.e. err wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import special
from scipy.optimize import brentq

MIN_SEEDS = 2  # issue 16, "Replicates": every arm entering theta or a contrast runs with at least two seeds


@dataclass(frozen=True)
class Combination:
    """A linear combination sum_a c_a mean_a of arm means: its estimate, its shared and seed variance, and the
    Satterthwaite degrees of freedom of the seed part (inf when no seed term enters)."""
    estimate: float
    var_shared: float
    var_seed: float
    df: float

    @property
    def var(self) -> float:
        return self.var_shared + self.var_seed

    def halfwidth(self, alpha: float) -> float:
        """Half the two-sided 1 - alpha interval (module docstring)."""
        return _halfwidth(1 - alpha / 2, self.var_shared, self.var_seed, self.df)

    def interval(self, alpha: float) -> tuple[float, float]:
        half = self.halfwidth(alpha)
        return self.estimate - half, self.estimate + half

    def p_greater(self) -> float:
        """One-sided p of the combination being > 0: the level at which the interval's lower bound reaches 0,
        so that a test at level q rejects exactly when the 1 - 2q interval excludes 0."""
        return one_sided_p(self.estimate, self.var_shared, self.var_seed, self.df)

    def p_less(self) -> float:
        """One-sided p of the combination being < 0."""
        return one_sided_p(-self.estimate, self.var_shared, self.var_seed, self.df)


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


@dataclass(frozen=True)
class Moments:
    """Means of arms (in `names` order) and their variance components: `shared` [A, A] the shared covariance of
    the arm means, `seed_var` [A] s^2 / S of each arm (0 with one seed: not estimable), `n_seeds` [A]."""
    names: tuple[str, ...]
    means: np.ndarray
    shared: np.ndarray
    seed_var: np.ndarray
    n_seeds: tuple[int, ...]

    @property
    def seed_df(self) -> np.ndarray:
        return np.array([n - 1 if n >= 2 else math.inf for n in self.n_seeds], float)

    def covariance(self) -> np.ndarray:
        """The total covariance of the arm means: shared plus (independent) seed noise."""
        return self.shared + np.diag(self.seed_var)

    def combine(self, coef: Sequence[float]) -> Combination:
        c = np.asarray(coef, float)
        seed_terms = c**2 * self.seed_var
        var_shared = max(float(c @ self.shared @ c), 0.0)  # a sum of estimated covariances can dip below 0
        return Combination(float(c @ self.means), var_shared, float(seed_terms.sum()),
                           satterthwaite(seed_terms, self.seed_df))

    def index(self, name: str) -> int:
        return self.names.index(name)


def satterthwaite(terms: np.ndarray, df: np.ndarray) -> float:
    """Satterthwaite's (1946) degrees of freedom of a sum of estimated variance `terms` with `df` degrees of
    freedom each (terms with infinite df count as known; inf when no term is estimated)."""
    finite = np.isfinite(df) & (terms > 0)
    denominator = float(np.sum(terms[finite] ** 2 / df[finite]))
    return float(terms[finite].sum()) ** 2 / denominator if denominator > 0 else math.inf


def _shared_within(replicates: np.ndarray) -> float:
    """The shared variance of an arm's mean from its runs' replicates [B, S]: the mean bootstrap covariance of
    two distinct runs; with one run, its whole bootstrap variance (nothing else can be told apart)."""
    s = replicates.shape[1]
    cov = np.atleast_2d(np.cov(replicates, rowvar=False, ddof=1))
    if s == 1:
        return float(cov[0, 0])
    return float((cov.sum() - np.trace(cov)) / (s * (s - 1)))


def _seed_var(values: np.ndarray) -> float:
    return float(np.var(values, ddof=1) / values.size) if values.size >= 2 else 0.0


def from_replicates(names: Sequence[str], values: Sequence[np.ndarray], replicates: Sequence[np.ndarray]) -> Moments:
    """Moments of arms from each run's point value ([S_a] per arm) and its joint item-bootstrap replicates
    ([B, S_a] per arm, the same B replicates for every arm: the table's P_boot)."""
    values = [np.asarray(v, float) for v in values]
    replicates = [np.asarray(r, float).reshape(len(r), -1) for r in replicates]
    arm_boot = np.column_stack([r.mean(1) for r in replicates])
    shared = np.atleast_2d(np.cov(arm_boot, rowvar=False, ddof=1))
    for a, r in enumerate(replicates):
        shared[a, a] = _shared_within(r)
    return Moments(tuple(names), np.array([v.mean() for v in values]), shared,
                   np.array([_seed_var(v) for v in values]), tuple(v.size for v in values))


def from_standard_errors(names: Sequence[str], values: Sequence[np.ndarray], se: Sequence[np.ndarray]) -> Moments:
    """Moments of arms from each run's point value and standard error (no replicates): the shared variance of an
    arm bounded by its runs' mean squared standard error, none between arms (module docstring: errs wide)."""
    values = [np.asarray(v, float) for v in values]
    shared = np.diag([float(np.mean(np.asarray(e, float) ** 2)) for e in se])
    return Moments(tuple(names), np.array([v.mean() for v in values]), shared,
                   np.array([_seed_var(v) for v in values]), tuple(v.size for v in values))


@dataclass(frozen=True)
class Ratio:
    """mean_num / mean_den with Fieller's interval at level 1 - alpha (unbounded: (-inf, inf), bounded False);
    the delta-method variance of the ratio at the estimate split into var_shared and var_seed (seed_var_terms:
    each arm's share of var_seed), df: Satterthwaite's df of the seed part; z and t: the quantiles used."""
    estimate: float
    low: float
    high: float
    bounded: bool
    var_shared: float
    var_seed: float
    df: float
    z: float
    t: float
    seed_var_terms: tuple[float, ...]

    @property
    def var(self) -> float:
        return self.var_shared + self.var_seed


def fieller(m: Moments, num: str, den: str, alpha: float) -> Ratio:
    """Fieller's (1954) interval for R = m.means[num] / m.means[den]: every R with
    (a - R b)^2 <= z^2 V_shared(a - R b) + t^2 V_seed(a - R b), each component at its own quantile (module
    docstring), t at Satterthwaite's df of the seed part of a - R b at the estimate. A quadratic inequality in R:
    bounded when b is distinguishable from 0 at this level, the whole line otherwise."""
    i, j = m.index(num), m.index(den)
    a, b = float(m.means[i]), float(m.means[j])
    if b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        nan = math.nan
        return Ratio(nan, -math.inf, math.inf, False, nan, nan, nan, nan, nan, tuple(nan for _ in m.names))
    r = a / b
    coef = np.zeros(len(m.names))
    coef[i], coef[j] = 1.0, -r
    combo = m.combine(coef)
    z, t = t_quantile(1 - alpha / 2, math.inf), t_quantile(1 - alpha / 2, combo.df)
    w = z * z * m.shared + t * t * np.diag(m.seed_var)
    qa = b * b - w[j, j]
    qb = a * b - w[i, j]
    qc = a * a - w[i, i]
    # the delta-method variance of the ratio at the estimate: Var(a - R b) / b^2
    terms = tuple(float(x) for x in (coef**2 * m.seed_var / b**2))
    common = dict(var_shared=combo.var_shared / b**2, var_seed=combo.var_seed / b**2, df=combo.df, z=z, t=t,
                  seed_var_terms=terms)
    if qa <= 0:  # the denominator is not distinguishable from 0 at this level
        return Ratio(r, -math.inf, math.inf, False, **common)
    half = math.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0 up to rounding: R itself satisfies the inequality
    return Ratio(r, float((qb - half) / qa), float((qb + half) / qa), True, **common)
