"""Which damages can answer the question: judged on kd and the parent only, before any theta (issue 28).

A damage is eligible when
1. the damage is beyond noise: the parent's damage has a paired item-bootstrap lower bound > 0 (`damage_ci_low`);
2. kd's mean gain has a two-sided 1 - alpha lower bound > 0;
3. kd's mean gain is at least `eligible_gain_share` x the damage;
4. kd's mean delta CKA has a two-sided 1 - alpha lower bound > 0;
5. kd changed the damaged weights: on a damage whose recovery keeps a constraint (families quantization and
   pruning) every kd run's record shows a non-zero fraction of the targeted values changed (`changed_fraction`;
   a record that does not say has not shown it).

The intervals of 2 and 4: the shared item (probe) part from the joint bootstrap, the seed part from kd's
between-seed variance pooled in absolute units across every damage whose kd arm has two seeds or more
(realign.analysis.theta.paired), df = sum (S_d - 1). No theta is read: the gain scale, not theta's.
docs/2026-12-06-statistics-reanalysis.md, part 1, states these rules as pre-registered.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta.damage import Damage
from realign.analysis.theta.paired import Paired, pool_seed_covariance

CONSTRAINED_FAMILIES = ("quantization", "pruning")  # recovery keeps the damage's grid or mask


@dataclass(frozen=True)
class Eligibility:
    """A damage's eligibility and every reason it fails (empty when eligible), with the numbers it read."""
    damage: str
    family: str
    eligible: bool
    reasons: tuple[str, ...]
    damage_value: float
    damage_low: float
    kd_gain: float
    kd_gain_low: float
    kd_gain_high: float
    kd_delta_cka: float
    kd_delta_cka_low: float
    kd_delta_cka_high: float
    changed_fraction: tuple[float, ...]


def _absolute(p: Paired) -> Paired:
    return dataclasses.replace(p, scale=1.0)


def eligibility(damages: Sequence[Damage], settings: AnalysisSettings) -> tuple[Eligibility, ...]:
    """Each damage's eligibility (module docstring)."""
    alpha = settings.alpha
    gains = [_absolute(d.gains(("kd",))) for d in damages]
    ckas = [_absolute(d.delta_cka(("kd",))) for d in damages]
    gain_seed, cka_seed = pool_seed_covariance(gains), pool_seed_covariance(ckas)
    out = []
    for d, g, c in zip(damages, gains, ckas):
        gain = g.combine(np.ones(1), gain_seed)
        cka = c.combine(np.ones(1), cka_seed)
        g_low, g_high = gain.interval(alpha)
        c_low, c_high = cka.interval(alpha)
        parent = d.kd.parent
        changed = d.kd.changed_fraction if d.kd.changed_fraction is not None else np.full(d.kd.n_seeds, np.nan)
        reasons = []
        if not parent.damage_low > 0:
            reasons.append(f"the damage {parent.damage:.4g} is not beyond noise (lower bound {parent.damage_low:.4g})")
        if not g_low > 0:
            reasons.append(f"kd's gain {gain.estimate:.4g} [{g_low:.4g}, {g_high:.4g}] has no lower bound above 0")
        if not gain.estimate >= settings.eligible_gain_share * parent.damage:
            share = gain.estimate / parent.damage if parent.damage else math.nan
            reasons.append(f"kd recovers {share:.2f} of the damage ({gain.estimate:.4g} of {parent.damage:.4g}), "
                           f"below eligible_gain_share {settings.eligible_gain_share:g}")
        if not c_low > 0:
            reasons.append(f"kd's delta CKA {cka.estimate:.4g} [{c_low:.4g}, {c_high:.4g}] has no lower bound "
                           "above 0")
        if d.family in CONSTRAINED_FAMILIES:
            if not np.isfinite(changed).all():
                reasons.append("kd's record does not show whether it changed the damaged weights "
                               "(no changed_fraction: an artifact made before the record said so)")
            elif not (changed > 0).all():
                reasons.append("kd changed none of the targeted values of the damage (changed_fraction "
                               + ", ".join(f"{x:.3g}" for x in changed) + "): it trained around the damage")
        out.append(Eligibility(d.label, d.family, not reasons, tuple(reasons), parent.damage, parent.damage_low,
                               gain.estimate, g_low, g_high, cka.estimate, c_low, c_high,
                               tuple(float(x) for x in changed)))
    return tuple(out)
