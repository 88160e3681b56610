"""H1', the claim's other falsifier: "CKA rises without performance", tested with the alignment-only arm on each
eligible damage, paired by seed with kd (issue 28).

On a damage, the arm shows the pattern when both one-sided tests reject:

* **CKA rises**: mean dCKA(only) - cka_rise_min x mean dCKA(kd) > 0, on the paired probe bootstrap;
* **without a meaningful recovery**: mean gain(only) - meaningful_recovery x mean gain(kd) < 0, on the joint
  item bootstrap;

each with its seed part pooled across the tested damages (realign.analysis.theta.paired). The arm's p is the
larger of the two (an intersection-union test, valid at the level of each: Berger 1982); across damages the
p-values are Holm-adjusted (Holm 1979) and compared with alpha / 2 by realign.analysis.theta.rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from realign.analysis.resampling import holm
from realign.analysis.theta.damage import Damage
from realign.analysis.theta.paired import Paired, SeedCovariance, pool_seed_covariance

ROLES = ("only", "kd")


@dataclass(frozen=True)
class OnlyTest:
    """The alignment-only arm against kd on one damage."""
    damage: str
    arm: str
    seeds: tuple[int, ...]
    delta_cka: float
    cka_threshold: float
    p_cka_rise: float
    gain: float
    gain_kd: float
    gain_threshold: float
    p_short: float
    p: float
    seed_df: float = 0.0  # of the pooled seed covariances; 0: one seed per arm, the seed variance unmeasured
    p_holm: float = math.nan

    @property
    def seed_variance_measured(self) -> bool:
        return math.isfinite(self.seed_df) and self.seed_df > 0

    @property
    def recovery_ratio(self) -> float:
        """gain(only) / gain(kd), a point value (description)."""
        return self.gain / self.gain_kd if self.gain_kd else math.nan


def one_sided_tests(cka: Paired, gains: Paired, cka_seed: SeedCovariance, gain_seed: SeedCovariance,
                    settings) -> tuple[float, float]:
    """(p of "CKA rises", p of "without a meaningful recovery") of the alignment-only arm against kd (module
    docstring), on paired delta CKA and gains ("only", "kd") with their pooled seed covariances."""
    rise = cka.combine(cka.coef({"only": 1.0, "kd": -settings.cka_rise_min}), cka_seed)
    short = gains.combine(gains.coef({"only": 1.0, "kd": -settings.meaningful_recovery}), gain_seed)
    return rise.p_greater(), short.p_less()


def h1prime(damages: Sequence[Damage], settings) -> tuple[OnlyTest, ...]:
    """The test on each of `damages` that has an alignment-only arm, Holm-adjusted across them."""
    tested = [d for d in damages if d.only is not None and len(d.seeds(ROLES)) > 0]
    if not tested:
        return ()
    ckas = [d.delta_cka(ROLES) for d in tested]
    gains = [d.gains(ROLES) for d in tested]
    cka_seed, gain_seed = pool_seed_covariance(ckas), pool_seed_covariance(gains)
    rows = []
    for d, c, g in zip(tested, ckas, gains):
        p_rise, p_short = one_sided_tests(c, g, cka_seed, gain_seed, settings)
        p = max(p_rise, p_short) if math.isfinite(p_rise) and math.isfinite(p_short) else math.nan
        rows.append(OnlyTest(d.label, d.only.recovery, c.seeds, float(c.means[0]),
                             settings.cka_rise_min * float(c.means[1]), p_rise, float(g.means[0]),
                             float(g.means[1]), settings.meaningful_recovery * float(g.means[1]), p_short, p,
                             min(cka_seed.df, gain_seed.df)))
    finite = [i for i, r in enumerate(rows) if math.isfinite(r.p)]
    adjusted = dict(zip(finite, holm([rows[i].p for i in finite]))) if finite else {}
    return tuple(replace(r, p_holm=adjusted.get(i, math.nan)) for i, r in enumerate(rows))
