"""theta = 1 - gain(held) / gain(kd) per eligible damage, paired by seed, and its fixed-effect summary.

Per damage d (realign.analysis.theta.paired): the per-seed pivot L_s(R) = g_held,s - R g_kd,s on the joint item
bootstrap; the shared item part of its mean from distinct seeds' replicates (normal quantile); the seed part from
one 2 x 2 seed covariance of (g_held, g_kd) / gain(kd), pooled across the eligible damages with df = sum (S_d - 1)
(Student's t). theta_d's interval is Fieller's on R (theta = 1 - R). Its tests invert the same pivot:

* refute, H0 theta_d >= theta_refute: L_d(1 - theta_refute) > 0, one-sided p;
* support, H0 theta_d <= theta_support: L_d(1 - theta_support) < 0, one-sided p;

Holm-adjusted across the eligible damages within each family of tests (realign.analysis.resampling.holm) and
compared with alpha / 2 by the rules (realign.analysis.theta.rules): with one damage this is exactly the two-sided
1 - alpha interval's bound against the threshold.

The summary across eligible damages is a fixed effect, conditional on these damages: the common R solving
sum_d a_d L_d(R) = 0 with a_d = gain_kd,d / Var(L_d(R_d)) (the efficient weights of a ratio estimating equation,
fixed at each damage's own estimate), its Fieller interval from the same combined pivot (item part from the joint
bootstrap, whose shared items give the damages' covariance; seed part from the pooled covariance). Random effects
(DerSimonian-Laird with HKSJ, realign.analysis.pooling) are description only while k <= 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realign.analysis.components import t_quantile
from realign.analysis.pooling import Pooled, random_effects
from realign.analysis.resampling import holm
from realign.analysis.theta.damage import Damage
from realign.analysis.theta.paired import Bound, Paired, SeedCovariance, fieller_set, pool_seed_covariance

ROLES = ("held", "kd")


@dataclass(frozen=True)
class ThetaDamage:
    """theta on one eligible damage: estimate, Fieller interval at `level` (bounded False: the whole line), the
    arms' mean gains, the delta-method variance parts of theta at the estimate, df (pooled), seeds paired, the
    one-sided p of the refute and support tests and their Holm-adjusted values."""
    damage: str
    family: str
    held: str
    kd: str
    seeds: tuple[int, ...]
    unpaired: tuple[str, ...]
    gain_held: float
    gain_kd: float
    theta: float
    low: float
    high: float
    bounded: bool
    level: float
    var_item: float
    var_seed: float
    df: float
    p_refute: float
    p_support: float
    p_refute_holm: float = math.nan
    p_support_holm: float = math.nan

    @property
    def seed_variance_measured(self) -> bool:
        """Whether the interval holds the training seeds' variance: a pooled seed covariance with df >= 1. With one
        seed per arm on every tested damage it is not measured, and theta cannot decide
        (realign.analysis.theta.rules)."""
        return math.isfinite(self.df) and self.df > 0

    @property
    def var(self) -> float:
        return self.var_item + self.var_seed


@dataclass(frozen=True)
class ThetaSummary:
    """The fixed-effect summary (estimate, interval, weights by damage) and the random-effects description."""
    theta: float
    low: float
    high: float
    bounded: bool
    level: float
    damages: tuple[str, ...]
    weights: tuple[float, ...]
    random_effects: Pooled | None
    method: str


@dataclass(frozen=True)
class ThetaEstimate:
    damages: tuple[ThetaDamage, ...]
    summary: ThetaSummary | None
    seed: SeedCovariance


def _pivot(p: Paired, r: float) -> np.ndarray:
    return p.coef({"held": 1.0, "kd": -r})


def _p_pivot(p: Paired, r: float, seed: SeedCovariance) -> Bound:
    return p.combine(_pivot(p, r), seed)


def estimate(damages: Sequence[Damage], settings) -> ThetaEstimate:
    """theta on each damage of `damages` (the eligible ones, each with a held arm), Holm, and the summary."""
    return estimate_paired([(d.label, d.family, d.held.recovery, d.kd.recovery, tuple(d.unpaired(ROLES)))
                            for d in damages], [d.gains(ROLES) for d in damages], settings)


def estimate_paired(names: Sequence[tuple[str, str, str, str, tuple[str, ...]]], gains: Sequence[Paired],
                    settings) -> ThetaEstimate:
    """:func:`estimate` on paired gains (arms "held", "kd"), named (damage, family, held, kd, unpaired runs):
    the form the power simulation calls (realign.analysis.theta.power)."""
    alpha = settings.alpha
    gains = list(gains)
    seed = pool_seed_covariance(gains)
    rows = []
    for (label, family, held, kd, unpaired), p in zip(names, gains):
        ratio = p.ratio("held", "kd", seed, alpha)
        refute = _p_pivot(p, 1 - settings.theta_refute, seed).p_greater()
        support = _p_pivot(p, 1 - settings.theta_support, seed).p_less()
        rows.append(ThetaDamage(
            label, family, held, kd, p.seeds, unpaired,
            float(p.means[0]), float(p.means[1]), 1 - ratio.estimate, 1 - ratio.high, 1 - ratio.low, ratio.bounded,
            1 - alpha, ratio.var_shared, ratio.var_seed, ratio.df, refute, support))
    if rows:
        refute_holm = holm([r.p_refute for r in rows])
        support_holm = holm([r.p_support for r in rows])
        rows = [ThetaDamage(**{**r.__dict__, "p_refute_holm": a, "p_support_holm": b})
                for r, a, b in zip(rows, refute_holm, support_holm)]
    return ThetaEstimate(tuple(rows), _summary(rows, gains, seed, alpha) if rows else None, seed)


def _summary(rows: list[ThetaDamage], gains: list[Paired], seed: SeedCovariance, alpha: float) -> ThetaSummary:
    """The fixed-effect common ratio and its Fieller interval (module docstring)."""
    # Weights a_d = gain_kd,d / Var(L_d(R_d)) at each damage's own estimate.
    weights = []
    for r, p in zip(rows, gains):
        v = _p_pivot(p, 1 - r.theta, seed) if math.isfinite(r.theta) else None
        weights.append(r.gain_kd / (v.var_shared + v.var_seed) if v and v.var_shared + v.var_seed > 0 else 0.0)
    a = np.array(weights)
    if not a.any():  # every pivot exactly without noise (held identical to kd run by run): weigh by kd's gain
        a = np.array([r.gain_kd for r in rows], float)
    num = float(sum(w * p.means[0] for w, p in zip(a, gains)))
    den = float(sum(w * p.means[1] for w, p in zip(a, gains)))
    labels = tuple(r.damage for r in rows)
    norm = a / a.sum() if a.sum() else a
    re = None
    if len(rows) >= 2 and all(math.isfinite(r.theta) and r.var > 0 for r in rows):
        re = random_effects([r.theta for r in rows], [r.var for r in rows], alpha)
    method = ("fixed effect, conditional on these damages: common R of sum_d a_d (g_held,d - R g_kd,d) = 0, "
              "a_d = gain_kd,d / Var(pivot_d), Fieller; random effects (DL, HKSJ) as description only")
    if den == 0 or not math.isfinite(num / den if den else math.nan):
        return ThetaSummary(math.nan, -math.inf, math.inf, False, 1 - alpha, labels, tuple(norm), re, method)
    # The combined pivot's variance: item part from the joint bootstrap (damages share items), seed part pooled.
    z = t_quantile(1 - alpha / 2, math.inf)
    t = t_quantile(1 - alpha / 2, seed.df) if seed.known else 0.0

    # Quadratic in R: Var(N - R D) = V_NN - 2R V_ND + R^2 V_DD, each part at its own quantile. The item part of
    # each damage counts only distinct seeds' covariance (realign.analysis.theta.paired), summed with the
    # cross-damage covariance of the arm means' replicates; the seed part from the pooled covariance.
    w_nn, w_nd, w_dd = _weighted_item(a, gains)
    factor = sum(w * w * p.scale**2 / p.n_seeds for w, p in zip(a, gains)) if seed.known else 0.0
    s_nn, s_nd, s_dd = (factor * seed.cov[0, 0], factor * seed.cov[0, 1], factor * seed.cov[1, 1]) \
        if seed.known else (0.0, 0.0, 0.0)
    wnn, wnd, wdd = z * z * w_nn + t * t * s_nn, z * z * w_nd + t * t * s_nd, z * z * w_dd + t * t * s_dd
    low_r, high_r, bounded = fieller_set(num, den, wnn, wnd, wdd)
    return ThetaSummary(1 - num / den, 1 - high_r, 1 - low_r, bounded, 1 - alpha, labels, tuple(norm), re, method)


def _weighted_item(a: np.ndarray, gains: list[Paired]) -> tuple[float, float, float]:
    """The item variance parts (NN, ND, DD) of N = sum a_d mean g_held,d and D = sum a_d mean g_kd,d: within a
    damage the distinct-seed covariance, between damages the covariance of the arm means' replicates."""
    k = len(gains)
    means = [p.replicates.mean(1) for p in gains]  # [B, 2] each
    out = np.zeros((2, 2))
    for i in range(k):
        for j in range(k):
            if i == j:
                block = gains[i].shared_covariance()
            else:
                x, y = means[i] - means[i].mean(0), means[j] - means[j].mean(0)
                block = x.T @ y / (len(x) - 1)
            out += a[i] * a[j] * block
    return float(out[0, 0]), float(out[0, 1]), float(out[1, 1])
