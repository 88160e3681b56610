"""Quantities of arms paired by training seed, with one seed covariance pooled across damages.

On one damaged parent, arms (held, kd, alignment-only, the parent itself) are measured per training seed s: a
vector x_s of A values (a gain, a delta CKA, a KL per arm) and, for each, B resampling replicates drawn *jointly*
for every run (the same resampled items, probe sequences or prompts). Runs of two arms with the same seed share
their data order (realign/training.py), so they are a pair, not independent draws: a quantity of the damage is a
linear combination c' x̄ of the arm means over the paired seeds, and its variance is

    Var(c' x̄) = c' I c  +  c' C c · scale² / S,

* I, the **shared** (item / probe / prompt) covariance of the arm means: the mean bootstrap covariance of two
  *distinct* seeds' values (the part every run shares: the sample of items and the parent's own measurement; a
  run's own item x model noise is in the seed part, not counted twice: the one-way random-effects decomposition of
  realign.analysis.components, here for vectors). With one seed, the whole bootstrap covariance.
* C, the **seed** covariance of x_s in units of `scale` (kd's mean quantity on that damage: the theta scale),
  pooled across damages with weights S_d - 1, df = sum (S_d - 1) (:func:`pool_seed_covariance`).

The shared part is taken at the normal quantile, the seed part at Student's t with the pooled df (each component
at its own quantile, as realign.analysis.components argues). Fieller's interval of a ratio (:meth:`Paired.ratio`)
is the set of R whose pivot c(R) = e_num - R e_den is not rejected; both variance parts are quadratic in R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realign.analysis.components import one_sided_p, t_quantile


@dataclass(frozen=True)
class SeedCovariance:
    """A seed covariance [A, A] in units of each damage's scale, and its degrees of freedom (0: not estimable)."""
    cov: np.ndarray
    df: float

    @property
    def known(self) -> bool:
        return self.df > 0


def pool_seed_covariance(quantities: Sequence["Paired"]) -> SeedCovariance:
    """The seed covariance pooled over damages (module docstring): sum_d (S_d - 1) C_d / sum_d (S_d - 1)."""
    terms = [(q.n_seeds - 1, q.seed_covariance()) for q in quantities if q.n_seeds >= 2]
    dof = sum(n for n, _ in terms)
    if not dof:
        a = quantities[0].values.shape[1] if quantities else 0
        return SeedCovariance(np.zeros((a, a)), 0.0)
    return SeedCovariance(sum(n * c for n, c in terms) / dof, float(dof))


@dataclass(frozen=True)
class Bound:
    """A linear combination's estimate and its variance parts (shared at z, seed at t(df))."""
    estimate: float
    var_shared: float
    var_seed: float
    df: float

    def upper(self, level: float) -> float:
        """The one-sided `level` upper bound (e.g. 0.95)."""
        return self.estimate + _half(level, self.var_shared, self.var_seed, self.df)

    def interval(self, alpha: float) -> tuple[float, float]:
        half = _half(1 - alpha / 2, self.var_shared, self.var_seed, self.df)
        return self.estimate - half, self.estimate + half

    def p_greater(self) -> float:
        return one_sided_p(self.estimate, self.var_shared, self.var_seed, self.df)

    def p_less(self) -> float:
        return one_sided_p(-self.estimate, self.var_shared, self.var_seed, self.df)


def _half(q: float, var_shared: float, var_seed: float, df: float) -> float:
    z = t_quantile(q, math.inf)
    t = t_quantile(q, df) if var_seed > 0 and df > 0 else 0.0
    return math.sqrt(max(z * z * var_shared + t * t * var_seed, 0.0))


@dataclass(frozen=True)
class Ratio:
    """R = mean_num / mean_den with Fieller's interval (bounded False: the whole line), the pivot's variance parts
    at the estimate divided by mean_den^2 (the delta-method variance of R), and df."""
    estimate: float
    low: float
    high: float
    bounded: bool
    var_shared: float
    var_seed: float
    df: float

    @property
    def var(self) -> float:
        return self.var_shared + self.var_seed


@dataclass(frozen=True)
class Paired:
    """Arms `names` on one damage, paired by `seeds`: values [S, A], replicates [B, S, A] (None: no resampling,
    `own_se` [S, A] then stands for independent noise of each run, which errs wide), `scale` (the damage's unit for
    pooling seed covariance)."""
    names: tuple[str, ...]
    seeds: tuple[int, ...]
    values: np.ndarray
    replicates: np.ndarray | None
    scale: float
    own_se: np.ndarray | None = None

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def means(self) -> np.ndarray:
        return self.values.mean(0)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def coef(self, weights: dict[str, float]) -> np.ndarray:
        c = np.zeros(len(self.names))
        for name, w in weights.items():
            c[self.index(name)] += w
        return c

    def shared_covariance(self) -> np.ndarray:
        """I [A, A]: mean bootstrap covariance of two distinct seeds' values (one seed: its own covariance)."""
        if self.replicates is None:
            se = np.asarray(self.own_se, float) if self.own_se is not None else np.zeros_like(self.values)
            return np.diag((se**2).mean(0) / max(self.n_seeds, 1))  # independent per run: errs wide
        r = self.replicates - self.replicates.mean(0)
        b, s, a = r.shape
        total = r.sum(1)  # [B, A]
        full = total.T @ total / (b - 1)                     # sum over all (s, s') pairs
        own = np.einsum("bsi,bsj->ij", r, r) / (b - 1)         # the s = s' pairs
        if s == 1:
            return own
        return (full - own) / (s * (s - 1))

    def seed_covariance(self) -> np.ndarray:
        """The between-seed covariance of the values in units of `scale` (zeros with one seed)."""
        if self.n_seeds < 2:
            return np.zeros((self.values.shape[1],) * 2)
        return np.atleast_2d(np.cov(self.values / self.scale, rowvar=False, ddof=1))

    def combine(self, c: np.ndarray, seed: SeedCovariance) -> Bound:
        """c' x̄ with its shared and (pooled) seed variance."""
        c = np.asarray(c, float)
        var_shared = max(float(c @ self.shared_covariance() @ c), 0.0)
        var_seed = max(float(c @ seed.cov @ c), 0.0) * self.scale**2 / self.n_seeds if seed.known else 0.0
        return Bound(float(c @ self.means), var_shared, var_seed, seed.df if seed.known else math.inf)

    def ratio(self, num: str, den: str, seed: SeedCovariance, alpha: float, offset: dict[str, float] | None = None
              ) -> Ratio:
        """Fieller's 1 - alpha interval of (num + offset) / den: every R with
        (a - R b)^2 <= z^2 I(R) + t^2 C(R) scale^2 / S."""
        j = self.index(den)
        base = self.coef({num: 1.0, **(offset or {})})
        a, b = float(base @ self.means), float(self.means[j])
        if b == 0 or not (math.isfinite(a) and math.isfinite(b)):
            return Ratio(math.nan, -math.inf, math.inf, False, math.nan, math.nan, math.nan)
        z = t_quantile(1 - alpha / 2, math.inf)
        t = t_quantile(1 - alpha / 2, seed.df) if seed.known else 0.0
        shared = self.shared_covariance()
        w = z * z * shared + (t * t * seed.cov * self.scale**2 / self.n_seeds if seed.known else 0.0)
        ej = np.zeros(len(self.names))
        ej[j] = 1.0
        waa, wab, wbb = float(base @ w @ base), float(base @ w @ ej), float(w[j, j])
        r = a / b
        at_r = self.combine(base - r * ej, seed)
        common = dict(var_shared=at_r.var_shared / b**2, var_seed=at_r.var_seed / b**2, df=at_r.df)
        return Ratio(r, *fieller_set(a, b, waa, wab, wbb), **common)


def fieller_set(a: float, b: float, waa: float, wab: float, wbb: float) -> tuple[float, float, bool]:
    """(low, high, bounded) of Fieller's (1954) set {R: (a - R b)^2 <= waa - 2 R wab + R^2 wbb}, the w's the
    quantile-weighted variance parts of the numerator, their covariance and the denominator. Unbounded (the whole
    line) when the denominator is not distinguishable from 0 at this level."""
    qa, qb, qc = b * b - wbb, a * b - wab, a * a - waa
    if qa <= 0:
        return -math.inf, math.inf, False
    half = math.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0 up to rounding: a / b itself lies in the set
    return (qb - half) / qa, (qb + half) / qa, True


def paired_seeds(*seed_lists: Sequence[int]) -> tuple[int, ...]:
    """The seeds every arm has, in the first arm's order."""
    common = set(seed_lists[0]).intersection(*map(set, seed_lists[1:]))
    return tuple(s for s in seed_lists[0] if s in common)


def take(values: np.ndarray, seeds: Sequence[int], wanted: Sequence[int]) -> np.ndarray:
    """The entries of `values` (first axis per run, in `seeds` order) for the `wanted` seeds, in that order."""
    where = [list(seeds).index(s) for s in wanted]
    return np.asarray(values)[where]
