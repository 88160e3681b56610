"""Per-arm tests of "CKA rises without performance" (the paper's second falsification pattern), each arm against
kd on the same damaged parent, with intervals and a multiplicity correction -- never a point value.

For every arm a other than kd and the held arm (alignment-only, sft, cka-kd, alignment-blocked, kd from a damaged
teacher, ...) on a damaged parent where kd's gain is beyond noise -- the held arm is left out by design, not by its
results: its CKA is constrained not to rise, and whether it held is the manipulation check's question; testing it
here would only enlarge the Holm family:

* **CKA rises**: mean delta CKA(a) - cka_rise_min x mean delta CKA(kd) > 0 (a re-aligns at least that share of
  kd's re-alignment), one-sided p from the interval of realign.analysis.components (seed variance plus each
  run's probe-bootstrap standard error, recovered from the table's 95% delta CKA interval as width / (2 x 1.96));
* **without a meaningful recovery**: mean gain(a) - meaningful_recovery x mean gain(kd) < 0, one-sided p with the
  shared item noise from the joint item bootstrap and the seed variance (same module).

The arm shows the pattern when both hold: its p is the larger of the two (an intersection-union test, valid at
the level of each without adjustment: Berger 1982). Across the arms tested, the p-values are Holm-adjusted (Holm
1979); realign.analysis.preregistered compares them with alpha / 2 (the refutation's share of the error rate).
Arms with fewer than MIN_SEEDS seeds (or on a parent whose kd arm has fewer) are not tested, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats as sps

from realign.analysis.arms import HELD_METHOD, KD_METHOD, Arm, Arms, arms_by_parent, pick
from realign.analysis.components import MIN_SEEDS, fieller, from_replicates, from_standard_errors
from realign.analysis.resampling import holm
from realign.analysis.settings import AnalysisSettings

CKA_INTERVAL_LEVEL = 0.95  # the table's delta_cka_ci_low/high: the cka step's fixed 95% percentile interval


@dataclass(frozen=True)
class ArmEvidence:
    """One arm against kd on its damaged parent.

    delta_cka (+ _low/_high: the arm's mean delta CKA and its 1 - alpha interval), cka_threshold (cka_rise_min x
    kd's mean delta CKA), p_cka_rise; gain (+ _low/_high, the arm's mean gain), recovery_ratio (+ _low/_high:
    gain(a) / gain(kd), Fieller; +-inf when unbounded), p_short (of gain(a) < meaningful_recovery x gain(kd));
    p (max of the two), p_holm (over the tested arms; NaN when not tested); tested, note (why not)."""
    arm: str
    kd: str
    n_seeds: int
    n_seeds_kd: int
    delta_cka: float
    delta_cka_low: float
    delta_cka_high: float
    cka_threshold: float
    p_cka_rise: float
    gain: float
    gain_low: float
    gain_high: float
    recovery_ratio: float
    recovery_ratio_low: float
    recovery_ratio_high: float
    p_short: float
    p: float
    p_holm: float
    tested: bool
    note: str


def _cka_se(arm: Arm) -> np.ndarray:
    width = arm.delta_cka_ci_high - arm.delta_cka_ci_low
    return width / (2 * sps.norm.ppf(0.5 + CKA_INTERVAL_LEVEL / 2))


def evidence(arm: Arm, kd: Arm, settings: AnalysisSettings) -> ArmEvidence:
    """The two one-sided tests of one arm against kd (module docstring); p_holm NaN until `arm_evidence`."""
    alpha = settings.alpha
    cka = from_standard_errors(("a", "kd"), (arm.delta_cka, kd.delta_cka),
                               (_cka_se(arm), _cka_se(kd)))
    cka_own = cka.combine([1.0, 0.0])
    cka_excess = cka.combine([1.0, -settings.cka_rise_min])
    (ga, ba), (gk, bk) = arm.gains(), kd.gains()
    gains = from_replicates(("a", "kd"), (ga, gk), (ba, bk))
    gain_own = gains.combine([1.0, 0.0])
    short = gains.combine([1.0, -settings.meaningful_recovery])
    ratio = fieller(gains, "a", "kd", alpha)
    kd_gain_low = gains.combine([0.0, 1.0]).interval(alpha)[0]
    note = ""
    if min(arm.n_seeds, kd.n_seeds) < MIN_SEEDS:
        note = (f"not tested: {arm.n_seeds} seed(s) of the arm, {kd.n_seeds} of kd (at least {MIN_SEEDS} each: "
                "without replicates the seed variance is not in the interval)")
    elif not kd_gain_low > 0:
        note = (f"not tested: kd's gain on this parent is not beyond noise (lower bound {kd_gain_low:.4g}), so no "
                "recovery is meaningful to fall short of")
    p_cka, p_short = cka_excess.p_greater(), short.p_less()
    p = max(p_cka, p_short) if not note and math.isfinite(p_cka) and math.isfinite(p_short) else math.nan
    if not note and not math.isfinite(p):
        note = "not tested: a delta CKA interval or a gain is missing"
    return ArmEvidence(
        arm.label, kd.label, arm.n_seeds, kd.n_seeds, cka_own.estimate, *cka_own.interval(alpha),
        settings.cka_rise_min * float(cka.means[1]), p_cka, gain_own.estimate, *gain_own.interval(alpha),
        ratio.estimate, ratio.low, ratio.high, p_short, p, math.nan, not note, note)


def evidence_of_arms(arms: Arms, settings: AnalysisSettings, *, kd: str | None = None) -> tuple[ArmEvidence, ...]:
    """Every arm but kd and the held arms on every damaged parent with a kd arm, tested against it, p
    Holm-adjusted over the tested arms (module docstring)."""
    rows = []
    for on_parent in arms.values():
        reference = pick(on_parent, KD_METHOD, kd)
        if reference is None:
            continue
        rows += [evidence(a, reference, settings) for a in on_parent
                 if a is not reference and a.method != HELD_METHOD]
    tested = [i for i, r in enumerate(rows) if r.tested]
    adjusted = dict(zip(tested, holm([rows[i].p for i in tested]))) if tested else {}
    return tuple(replace(r, p_holm=adjusted[i]) if i in adjusted else r for i, r in enumerate(rows))


def arm_evidence(table: pd.DataFrame, settings: AnalysisSettings | None = None, *, kd: str | None = None,
                 **overrides) -> tuple[ArmEvidence, ...]:
    """:func:`evidence_of_arms` on the arms of the analysis table."""
    return evidence_of_arms(arms_by_parent(table), AnalysisSettings.resolve(settings, **overrides), kd=kd)
