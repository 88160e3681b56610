"""The pre-registered verdict of the study on theta (issue 16, "Pre-registered verdict rules"), applied by one
function, :func:`verdict`, to the estimand (realign.analysis.estimand), the manipulation checks
(realign.analysis.manipulation) and the per-arm tests (realign.analysis.arm_tests).

The thresholds are keys of the config's `analysis:` block (defaults in workflow/schemas/config.schema.yaml, fixed
before any theta was measured); alpha is the error rate. Every rule reads an interval or an adjusted p-value,
never a point value. The defaults and why:

* theta_support 0.5: "recovers *by* re-aligning" claims the mechanism, i.e. most of the recovery; a lower bound
  above one half says that preventing re-alignment costs most of kd's recovery.
* theta_refute 0.25: the paper's "performance recovers while CKA stays low" -- with the clamp holding, at least
  three quarters of kd's recovery survive. Between 0.25 and 0.5 (partial dependence) theta decides nothing.
* meaningful_recovery 0.25 and cka_rise_min 0.5 (shares of kd's gain and of kd's delta CKA on the same parent):
  an arm "raises CKA" when it re-aligns at least half as much as kd, and "without performance" when it recovers
  less than a quarter of what kd recovers -- relative to kd, so the rule means the same on every damage.
* held_cka_margin 0.25: the held arm's delta CKA bound is its allowed share of kd's plus a quarter of kd's. Every
  run's 95% interval must lie under it, so a perfectly clamped run (true delta CKA 0) passes only when the margin
  exceeds its interval's half-width; at kd's 0.06-0.07 (the default study's kd, issue 16) a margin of 0.1 x kd's
  would sit at about the half-width of a probe standard error of 0.003 and could hardly ever pass.
* kl_margin 0.2: the held arm must achieve at least 80% of kd's reduction of the KL to the teacher, so that a
  lower gain is not just worse output matching.

Rules, evaluated in this order and all reported:

1. **refute-clamp** ("performance recovers while CKA stays low"): the upper bound of the pooled theta's 1 - alpha
   interval is below theta_refute, the manipulation check passed on every damaged parent pooled (the clamp held
   and the outputs matched), and every arm in theta has at least MIN_SEEDS seeds.
2. **refute-cka-without-recovery** ("CKA rises without performance"): some arm's Holm-adjusted p (over the arms
   tested: both "CKA rises beyond cka_rise_min of kd's" and "gain below meaningful_recovery of kd's") is below
   alpha / 2.
3. **support-theta**: the lower bound of the pooled theta's 1 - alpha interval is above theta_support, with the
   same manipulation-check and seed conditions as rule 1.

Outcome: **refuted** when rule 1 or 2 fires (the first that fires is named; the paper names both patterns as
what would falsify the claim, so they take precedence, and when rule 3 is met as well the reason says so: the
data then show re-alignment necessary for kd but not sufficient); else **supported** when rule 3 fires; else
**inconclusive**, with each rule's reason for not firing.

Error rates: the bounds of a two-sided 1 - alpha interval are one-sided alpha / 2 tests, so under theta =
theta_support the false support rate is at most alpha / 2, and under theta = theta_refute rule 1 refutes at most
alpha / 2 of the time; rule 2 runs at alpha / 2 after Holm, so a false refutation by either rule stays within
alpha (Bonferroni over the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd

from realign.analysis.arm_tests import ArmEvidence, evidence_of_arms
from realign.analysis.arms import Arms, arms_by_parent
from realign.analysis.estimand import Theta, theta_of_arms
from realign.analysis.manipulation import ManipulationCheck, checks_of_arms
from realign.analysis.settings import AnalysisSettings

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
REFUTE_CLAMP = "refute-clamp"
REFUTE_CKA = "refute-cka-without-recovery"
SUPPORT_THETA = "support-theta"


@dataclass(frozen=True)
class Rule:
    """One rule as evaluated: whether it fired, why (or why not), and the numbers it read."""
    name: str
    outcome: str
    fired: bool
    reason: str
    numbers: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Verdict:
    """supported / refuted / inconclusive; `rule`: the rule that decided (None when inconclusive); `reason`: one
    sentence; `numbers`: what the deciding rule read; `rules`: every rule in order, fired or not."""
    outcome: str
    rule: str | None
    reason: str
    numbers: tuple[tuple[str, float], ...]
    rules: tuple[Rule, ...]


def _theta_preconditions(theta: Theta, checks: Sequence[ManipulationCheck]) -> list[str]:
    """Why theta cannot decide (empty when it can): no pooled theta, a damage with too few seeds, a damage
    without a passing manipulation check."""
    if theta.pooled is None:
        return ["no damaged parent has both a held arm and a kd arm with a positive kd gain, so theta is undefined"]
    problems = []
    pooled = set(theta.pooled.damages)
    by_damage = {(c.label, c.held): c for c in checks}
    for d in theta.damages:
        if d.label not in pooled:
            continue
        if not d.seeds_ok:
            problems.append(f"{d.label}: theta rests on {d.n_seeds_held} held and {d.n_seeds_kd} kd seed(s); "
                            "without two of each, seed variance is not in its interval")
        c = by_damage.get((d.label, d.held))
        if c is None:
            problems.append(f"{d.label}: no manipulation check of {d.held}")
        elif not c.passed:
            problems.append(f"{d.label}: the manipulation check of {d.held} did not pass ("
                            + "; ".join(p.statement for p in c.failures) + ")")
    return problems


def _theta_numbers(theta: Theta, threshold_name: str, threshold: float) -> tuple[tuple[str, float], ...]:
    p = theta.pooled
    if p is None:
        return ((threshold_name, threshold),)
    return (("theta", p.estimate), ("theta_low", p.low), ("theta_high", p.high), ("level", p.level),
            ("k_damages", float(p.k)), (threshold_name, threshold))


def _theta_rule(theta: Theta, blockers: list[str], name: str, outcome: str, threshold_name: str, threshold: float,
                *, upper: bool, meaning: str) -> Rule:
    """Rules 1 and 3: the pooled theta's upper bound below (upper=True) or lower bound above (upper=False) the
    threshold, firing only when nothing blocks theta (manipulation checks, seeds)."""
    numbers = _theta_numbers(theta, threshold_name, threshold)
    pooled, blocked = theta.pooled, "; ".join(blockers)
    if pooled is None:
        return Rule(name, outcome, False, blocked, numbers)
    bound, side, relation = ((pooled.high, "upper", "below") if upper else (pooled.low, "lower", "above"))
    clears = bound < threshold if upper else bound > threshold
    where = (f"pooled theta {pooled.estimate:.3f} [{pooled.low:.3f}, {pooled.high:.3f}] "
             f"({pooled.level:.0%}, {pooled.k} damage(s))")
    if clears and not blockers:
        reason = f"{where}: {side} bound {relation} {threshold_name} {threshold} with the clamp holding -- {meaning}"
    elif clears:
        reason = f"{where} is {relation} {threshold_name} {threshold}, but theta cannot decide: {blocked}"
    else:
        reason = f"{where}: {side} bound not {relation} {threshold_name} {threshold}"
    return Rule(name, outcome, clears and not blockers, reason, numbers)


def verdict(theta: Theta, checks: Sequence[ManipulationCheck], arms: Sequence[ArmEvidence],
            settings: AnalysisSettings | None = None, **overrides) -> Verdict:
    """The verdict by the rules of the module docstring."""
    s = AnalysisSettings.resolve(settings, **overrides)
    blockers = _theta_preconditions(theta, checks)

    # Rule 1: the clamp held and theta's upper bound is below theta_refute.
    clamp = _theta_rule(theta, blockers, REFUTE_CLAMP, REFUTED, "theta_refute", s.theta_refute, upper=True,
                        meaning="performance recovers while CKA stays low")

    # Rule 2: an arm raises CKA without a meaningful recovery, Holm over the arms tested, at alpha / 2.
    tested = [a for a in arms if a.tested]
    level = s.alpha / 2
    firing = [a for a in tested if a.p_holm < level]
    if firing:
        first = min(firing, key=lambda a: a.p_holm)
        reason = (f"{len(firing)} arm(s) raise CKA beyond {s.cka_rise_min} of kd's re-alignment with a recovery "
                  f"below {s.meaningful_recovery} of kd's (Holm over {len(tested)} arm(s), p < {level:g}): "
                  + "; ".join(f"{a.arm}: delta CKA {a.delta_cka:.4g} [{a.delta_cka_low:.4g}, {a.delta_cka_high:.4g}]"
                              f" vs threshold {a.cka_threshold:.4g}, gain / kd's {a.recovery_ratio:.3g} "
                              f"[{a.recovery_ratio_low:.3g}, {a.recovery_ratio_high:.3g}], Holm p {a.p_holm:.3g}"
                              for a in firing))
        numbers = (("p_holm", first.p_holm), ("level", level), ("delta_cka_low", first.delta_cka_low),
                   ("cka_threshold", first.cka_threshold), ("recovery_ratio_high", first.recovery_ratio_high),
                   ("meaningful_recovery", s.meaningful_recovery), ("n_arms_tested", float(len(tested))))
    else:
        smallest = min((a.p_holm for a in tested), default=math.nan)
        untested = [a for a in arms if not a.tested]
        reason = (f"no arm raises CKA without a meaningful recovery: smallest Holm p {smallest:.3g} over "
                  f"{len(tested)} arm(s), level {level:g}"
                  + (f" ({len(untested)} arm(s) not tested: " + "; ".join(f"{a.arm} {a.note}" for a in untested)
                     + ")" if untested else ""))
        numbers = (("p_holm_min", smallest), ("level", level), ("n_arms_tested", float(len(tested))))
    cka = Rule(REFUTE_CKA, REFUTED, bool(firing), reason, numbers)

    # Rule 3: theta's lower bound clears theta_support with the clamp holding.
    support = _theta_rule(theta, blockers, SUPPORT_THETA, SUPPORTED, "theta_support", s.theta_support, upper=False,
                          meaning="preventing re-alignment costs most of kd's recovery")

    rules = (clamp, cka, support)
    deciding = next((r for r in (clamp, cka) if r.fired), None)
    if deciding is not None:
        reason = deciding.reason + (" (theta also clears theta_support: re-alignment is necessary for kd's "
                                    "recovery but not sufficient for recovery)" if support.fired else "")
        return Verdict(REFUTED, deciding.name, reason, deciding.numbers, rules)
    if support.fired:
        return Verdict(SUPPORTED, support.name, support.reason, support.numbers, rules)
    reason = "inconclusive: " + " | ".join(f"{r.name}: {r.reason}" for r in rules)
    return Verdict(INCONCLUSIVE, None, reason, (), rules)


@dataclass(frozen=True)
class ThetaAnalysis:
    """Everything the verdict on theta reads, and the verdict."""
    theta: Theta
    checks: tuple[ManipulationCheck, ...]
    arms: tuple[ArmEvidence, ...]
    verdict: Verdict


def analyze_arms(arms: Arms, settings: AnalysisSettings, *, held: str | None = None, kd: str | None = None,
                 allowed_fraction: Mapping[str, float] | None = None) -> ThetaAnalysis:
    """theta, the manipulation checks, the per-arm tests and the verdict from the arms of a study (`held`, `kd`,
    `allowed_fraction` as in realign.analysis.estimand.theta_of_arms and realign.analysis.manipulation)."""
    result = theta_of_arms(arms, settings.alpha, held=held, kd=kd)
    checks = checks_of_arms(arms, settings, held=held, kd=kd, allowed_fraction=allowed_fraction)
    evidence = evidence_of_arms(arms, settings, kd=kd)
    return ThetaAnalysis(result, checks, evidence, verdict(result, checks, evidence, settings))


def analyze_theta(table: pd.DataFrame, settings: AnalysisSettings | None = None, *, held: str | None = None,
                  kd: str | None = None, allowed_fraction: Mapping[str, float] | None = None,
                  **overrides) -> ThetaAnalysis:
    """:func:`analyze_arms` on the arms of the analysis table."""
    return analyze_arms(arms_by_parent(table), AnalysisSettings.resolve(settings, **overrides), held=held, kd=kd,
                        allowed_fraction=allowed_fraction)
