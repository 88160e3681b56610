"""The pre-registered test of the study, in one home (issue 28): does kd recover a damaged model *because* it
re-aligns its hidden geometry?

* :mod:`~realign.analysis.theta.paired`: arms paired by training seed, one seed covariance pooled across damages,
  Fieller intervals and one-sided bounds;
* :mod:`~realign.analysis.theta.damage`: one damaged parent's kd, held and alignment-only arms and their paired
  gains, delta CKA and KL;
* :mod:`~realign.analysis.theta.eligibility`: which damages can answer, judged on kd and the parent only;
* :mod:`~realign.analysis.theta.estimator`: theta per eligible damage, Holm, the fixed-effect summary;
* :mod:`~realign.analysis.theta.check`: the manipulation check per arm (CKA, KL; H2's measures);
* :mod:`~realign.analysis.theta.h1prime`: "CKA rises without performance" with alignment-only;
* :mod:`~realign.analysis.theta.rules`: the per-damage and overall verdict;
* :mod:`~realign.analysis.theta.power`: the power simulation at the measured noise, and the sizing.

:func:`analyze_arms` runs them in that order. The descriptive association statistics (correlations, OLS, mixed
model, contrasts) stay apart in realign.analysis.stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from realign.analysis.arms import Arms, arms_by_parent
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta.check import ArmCheck, checks
from realign.analysis.theta.damage import Damage, damages_of_arms
from realign.analysis.theta.eligibility import Eligibility, eligibility
from realign.analysis.theta.estimator import ThetaEstimate, estimate
from realign.analysis.theta.h1prime import OnlyTest, h1prime
from realign.analysis.theta.rules import Verdict, damage_verdict, overall


@dataclass(frozen=True)
class ThetaAnalysis:
    """Everything the pre-registered verdict reads, and the verdict."""
    damages: tuple[Damage, ...]
    eligibility: tuple[Eligibility, ...]
    theta: ThetaEstimate
    checks: tuple[ArmCheck, ...]
    only: tuple[OnlyTest, ...]
    verdict: Verdict


def analyze_arms(arms: Arms, settings: AnalysisSettings, *, held: str | None = None, kd: str | None = None,
                 only: str | None = None) -> ThetaAnalysis:
    """Eligibility, theta, the check, H1' and the verdict of the arms of a study."""
    damages = damages_of_arms(arms, held=held, kd=kd, only=only)
    judged = eligibility(damages, settings)
    eligible = [d for d, e in zip(damages, judged) if e.eligible]
    with_held = [d for d in eligible if d.held is not None]
    theta = estimate(with_held, settings)
    arm_checks = checks(with_held, settings)
    only_tests = h1prime(eligible, settings)
    by_label = {t.damage: t for t in theta.damages}
    check_by = {c.damage: c for c in arm_checks}
    only_by = {o.damage: o for o in only_tests}
    verdicts = [damage_verdict(e, by_label.get(e.damage), check_by.get(e.damage), only_by.get(e.damage), settings)
                for e in judged]
    return ThetaAnalysis(damages, judged, theta, arm_checks, only_tests, overall(verdicts))


def analyze_theta(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> ThetaAnalysis:
    """:func:`analyze_arms` on the arms of the analysis table."""
    return analyze_arms(arms_by_parent(table), AnalysisSettings.resolve(settings, **overrides))
