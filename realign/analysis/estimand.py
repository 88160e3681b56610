"""The estimand of the study: theta, the share of kd's recovery lost when re-alignment is prevented.

Per damaged parent d (a base model with one damage):

    theta_d = 1 - gain(held) / gain(kd),

gain = P(run) - P(parent) on the primary, per-item measure (the table's P), each arm's gain the mean over its
training seeds. theta = 0: holding CKA down costs no recovery (re-alignment is not how kd recovers); theta = 1:
all of it. The held arm is the recovery whose method is `alignment-held` (kd under a constraint that keeps each
pre-registered layer's CKA to the teacher at or below the damaged model's value); kd is the plain kd arm from the
undamaged teacher on the same parent.

Interval (realign.analysis.components): Fieller's interval of gain(held) / gain(kd), with the variance of
gain(held) - R gain(kd) from two components -- the shared item noise (the table's jointly drawn item-bootstrap
replicates P_boot: both arms and their common parent resampled on the same items) and the seed-to-seed variance
of each arm's gains -- the shared part at the normal quantile, the seed part at Student's t with Satterthwaite's
degrees of freedom. With two seeds per arm the seed part has one degree of freedom per arm and the interval is
wide accordingly (realign.analysis.components says why this does not understate the variance).

Pooled over damaged parents with a random effect per damage (realign.analysis.pooling: DerSimonian-Laird with the
HKSJ variance and t(k - 1)); the damages' item noise is correlated through the shared items, and that covariance
(from the same joint bootstrap, through each theta_d's linearisation) enters the pooled variance. A damage whose
kd arm does not gain on average (gain(kd) <= 0) has no meaningful theta and is left out of the pool, with the
reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from realign.analysis.arms import Arm, Arms, arms_by_parent, held_kd_pairs
from realign.analysis.components import MIN_SEEDS, fieller, from_replicates
from realign.analysis.pooling import Pooled, random_effects
from realign.analysis.settings import AnalysisSettings


@dataclass(frozen=True)
class ThetaDamage:
    """theta on one damaged parent, with its interval and what it rests on.

    gain_held / gain_kd: the arms' mean gains over seeds; theta, low, high: the estimate and its Fieller interval
    at `level` (bounded False: kd's gain is not distinguishable from 0, the interval is the whole line);
    var_item / var_seed: the delta-method variance of theta at the estimate split into the shared item part and
    the seed part (var_seed_held, var_seed_kd: each arm's share), df: Satterthwaite's degrees of freedom of the
    seed part, critical_item / critical_seed: the quantiles of the two parts (z, t_df); n_seeds_*, n_items
    (records of the primary measure, None when the table does not say),
    n_boot. `influence` holds theta's linearised item-bootstrap replicates, for the covariance between damages."""
    model: str
    degradation: str
    held: str
    kd: str
    held_artifacts: tuple[str, ...]
    kd_artifacts: tuple[str, ...]
    gain_held: float
    gain_kd: float
    theta: float
    low: float
    high: float
    bounded: bool
    level: float
    var_item: float
    var_seed: float
    var_seed_held: float
    var_seed_kd: float
    df: float
    critical_item: float
    critical_seed: float
    n_seeds_held: int
    n_seeds_kd: int
    n_items: int | None
    n_boot: int
    influence: np.ndarray = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.degradation}"

    @property
    def var(self) -> float:
        return self.var_item + self.var_seed

    @property
    def seeds_ok(self) -> bool:
        """Both arms replicated (at least MIN_SEEDS seeds): only then does the interval contain seed variance."""
        return min(self.n_seeds_held, self.n_seeds_kd) >= MIN_SEEDS


@dataclass(frozen=True)
class ThetaPooled:
    """theta pooled over damaged parents: the random-effects pooling (realign.analysis.pooling.Pooled: estimate,
    interval, k, tau2, q, var, df, weights, method) at `level`, of the damages named in `damages`; `excluded`:
    (damage, reason) left out."""
    pooling: Pooled
    level: float
    damages: tuple[str, ...]
    excluded: tuple[tuple[str, str], ...]

    @property
    def estimate(self) -> float:
        return self.pooling.estimate

    @property
    def low(self) -> float:
        return self.pooling.low

    @property
    def high(self) -> float:
        return self.pooling.high

    @property
    def k(self) -> int:
        return self.pooling.k


@dataclass(frozen=True)
class Theta:
    """theta per damaged parent and pooled (pooled None when no damage has a meaningful theta)."""
    damages: tuple[ThetaDamage, ...]
    pooled: ThetaPooled | None


def theta_damage(held: Arm, kd: Arm, alpha: float) -> ThetaDamage:
    """theta on the damaged parent of the two arms (module docstring)."""
    (gh, bh), (gk, bk) = held.gains(), kd.gains()
    moments = from_replicates(("held", "kd"), (gh, gk), (bh, bk))
    ratio = fieller(moments, "held", "kd", alpha)
    mean_h, mean_k = moments.means
    # theta = 1 - R: theta* - theta ~ -(L* - L) / gain(kd), L = gain(held) - R gain(kd) (the Fieller pivot)
    pivot = bh.mean(1) - ratio.estimate * bk.mean(1)
    influence = -(pivot - pivot.mean()) / mean_k if mean_k != 0 else np.full(len(pivot), np.nan)
    return ThetaDamage(
        held.model, held.degradation, held.recovery, kd.recovery, held.artifacts, kd.artifacts,
        float(mean_h), float(mean_k), 1 - ratio.estimate, 1 - ratio.high, 1 - ratio.low, ratio.bounded, 1 - alpha,
        ratio.var_shared, ratio.var_seed, *ratio.seed_var_terms, ratio.df, ratio.z, ratio.t, held.n_seeds,
        kd.n_seeds, held.parent.n_records, bh.shape[0],
        influence)


def pool(damages: tuple[ThetaDamage, ...], alpha: float) -> ThetaPooled | None:
    """theta pooled over `damages` with a random effect per damage (module docstring)."""
    excluded, kept = [], []
    for d in damages:
        if not d.gain_kd > 0:
            excluded.append((d.label, f"kd's mean gain {d.gain_kd:.4g} is not positive: no recovery to lose"))
        elif not (math.isfinite(d.var) and d.var > 0):
            excluded.append((d.label, f"theta's variance {d.var:.4g} is not positive and finite"))
        else:
            kept.append(d)
    if not kept:
        return None
    names = tuple(d.label for d in kept)
    if len(kept) == 1:
        d = kept[0]
        own = Pooled(d.theta, d.low, d.high, 1, 0.0, math.nan, math.nan, d.var, d.df, (1.0,),
                     "one damaged parent: its own interval")
        return ThetaPooled(own, d.level, names, tuple(excluded))
    influence = np.column_stack([d.influence for d in kept])
    covariance = np.cov(influence, rowvar=False, ddof=1)
    return ThetaPooled(random_effects([d.theta for d in kept], [d.var for d in kept], alpha, covariance), 1 - alpha,
                       names, tuple(excluded))


def theta_of_arms(arms: Arms, alpha: float, *, held: str | None = None, kd: str | None = None) -> Theta:
    """theta on every damaged parent that has both a held arm and a kd arm, and pooled, at level 1 - alpha.
    `held` / `kd` name the arms (configured recovery names) where a parent has several of a method (e.g. two
    doses of the held arm); by default the one arm of method alignment-held, and the one of kd from the
    undamaged teacher."""
    damages = tuple(theta_damage(h, k, alpha) for h, k in held_kd_pairs(arms, held, kd))
    return Theta(damages, pool(damages, alpha))


def theta(table: pd.DataFrame, settings: AnalysisSettings | None = None, *, held: str | None = None,
          kd: str | None = None, **overrides) -> Theta:
    """:func:`theta_of_arms` on the arms of the analysis table, at level 1 - settings.alpha."""
    alpha = AnalysisSettings.resolve(settings, **overrides).alpha
    return theta_of_arms(arms_by_parent(table), alpha, held=held, kd=kd)
