"""The pre-registered verdict on theta (realign.analysis.preregistered.verdict): each outcome and each rule, on
constructed results and on constructed tables; point values never decide."""

import math

import numpy as np
import pytest

from realign.analysis.arm_tests import ArmEvidence
from realign.analysis.estimand import Theta, ThetaDamage, ThetaPooled
from realign.analysis.manipulation import CheckPart, ManipulationCheck
from realign.analysis.pooling import Pooled
from realign.analysis.preregistered import (INCONCLUSIVE, REFUTE_CKA, REFUTE_CLAMP, REFUTED, SUPPORT_THETA, SUPPORTED,
                                            analyze_theta, verdict)
from realign.analysis.resampling import holm
from realign.analysis.settings import AnalysisSettings
from theta_tables import build, study

S = AnalysisSettings.defaults()  # theta_support 0.5, theta_refute 0.25, alpha 0.05


def _damage(point, low, high, label="q4", seeds=2):
    return ThetaDamage("m", label, "held", "kd", (), (), 0.05, 0.2, point, low, high, True, 0.95, 0.001, 0.001,
                       0.0005, 0.0005, 1.5, 1.96, 6.0, seeds, seeds, 400, 500, np.zeros(500))


def _theta(point, low, high, seeds=2):
    d = _damage(point, low, high, seeds=seeds)
    return Theta((d,), ThetaPooled(Pooled(point, low, high, 1, 0.0, math.nan, math.nan, 0.01, 1.5, (1.0,),
                                          "one damaged parent"), 0.95, ("m/q4",), ()))


def _check(passed=True):
    kl = CheckPart("kl", "passed" if passed else "failed", True, -0.01 if passed else 0.2, 0.0,
                   "output KL to the teacher: ..." + ("" if passed else " -- the constraint did not hold"))
    cka = CheckPart("delta_cka", "passed", True, 0.001, 0.006, "held delta CKA ...: passed")
    return ManipulationCheck("m", "q4", "held", "kd", 0.0, (cka, kl))


def _arm(p_holm, tested=True, name="m/q4/alignment-only"):
    return ArmEvidence(name, "m/q4/kd", 2, 2, 0.08, 0.07, 0.09, 0.03, p_holm, 0.0, -0.01, 0.01, 0.0, -0.05, 0.05,
                       p_holm, p_holm, p_holm if tested else math.nan, tested, "" if tested else "not tested: ...")


def test_supported_when_the_lower_bound_clears_theta_support_and_the_check_passes():
    v = verdict(_theta(0.8, 0.6, 0.95), [_check()], [], S)
    assert v.outcome == SUPPORTED and v.rule == SUPPORT_THETA
    assert dict(v.numbers)["theta_low"] == 0.6 and dict(v.numbers)["theta_support"] == 0.5
    assert [r.name for r in v.rules] == [REFUTE_CLAMP, REFUTE_CKA, SUPPORT_THETA]


def test_refuted_by_the_clamp():
    v = verdict(_theta(0.05, -0.1, 0.2), [_check()], [], S)
    assert v.outcome == REFUTED and v.rule == REFUTE_CLAMP
    assert "performance recovers while CKA stays low" in v.reason
    assert dict(v.numbers)["theta_high"] == 0.2 and dict(v.numbers)["theta_refute"] == 0.25


def test_refuted_by_cka_without_recovery_and_it_takes_precedence():
    v = verdict(_theta(0.4, 0.1, 0.7), [_check()], [_arm(0.001), _arm(0.5, name="m/q4/sft")], S)
    assert v.outcome == REFUTED and v.rule == REFUTE_CKA and "m/q4/alignment-only" in v.reason
    assert "m/q4/sft" not in v.reason
    assert dict(v.numbers)["p_holm"] == 0.001 and dict(v.numbers)["level"] == 0.025
    both = verdict(_theta(0.8, 0.6, 0.95), [_check()], [_arm(0.001)], S)
    assert both.outcome == REFUTED and both.rule == REFUTE_CKA and "also clears theta_support" in both.reason
    assert [r.fired for r in both.rules] == [False, True, True]


def test_inconclusive_between_the_thresholds_with_every_rule_s_reason():
    v = verdict(_theta(0.4, 0.1, 0.7), [_check()], [_arm(0.2)], S)
    assert v.outcome == INCONCLUSIVE and v.rule is None
    for name in (REFUTE_CLAMP, REFUTE_CKA, SUPPORT_THETA):
        assert name in v.reason
    assert "upper bound not below theta_refute" in v.reason and "lower bound not above theta_support" in v.reason


@pytest.mark.parametrize("interval", [(0.6, 0.95), (-0.1, 0.2)])
def test_a_failed_manipulation_check_decides_nothing_on_theta(interval):
    v = verdict(_theta(sum(interval) / 2, *interval), [_check(passed=False)], [], S)
    assert v.outcome == INCONCLUSIVE
    assert "did not pass" in v.reason and "the constraint did not hold" in v.reason


def test_theta_on_one_seed_decides_nothing():
    v = verdict(_theta(0.8, 0.6, 0.95, seeds=1), [_check()], [], S)
    assert v.outcome == INCONCLUSIVE and "1 held and 1 kd seed(s)" in v.reason


def test_no_theta_no_check():
    v = verdict(Theta((), None), [], [], S)
    assert v.outcome == INCONCLUSIVE and "theta is undefined" in v.reason
    v = verdict(_theta(0.8, 0.6, 0.95), [], [], S)
    assert v.outcome == INCONCLUSIVE and "no manipulation check" in v.reason


def test_point_values_never_decide():
    # theta's point is below theta_refute (or above theta_support), its interval is not
    assert verdict(_theta(0.1, -0.4, 0.7), [_check()], [], S).outcome == INCONCLUSIVE
    assert verdict(_theta(0.9, 0.45, 1.2), [_check()], [], S).outcome == INCONCLUSIVE
    # an arm's unadjusted p is below alpha / 2, its Holm-adjusted p is not; an untested arm never counts
    assert verdict(_theta(0.4, 0.1, 0.7), [_check()], [_arm(0.03), _arm(0.001, tested=False)], S).outcome \
        == INCONCLUSIVE


def test_thresholds_come_from_the_settings():
    t = _theta(0.8, 0.6, 0.95)
    assert verdict(t, [_check()], [], S.replace(theta_support=0.7)).outcome == INCONCLUSIVE
    assert verdict(t, [_check()], [], theta_support=0.55).outcome == SUPPORTED


# ---- end to end, from constructed tables (tests/theta_tables.py) ----

HELD = {"held": "alignment-held"}
THREE = ("q4", "prune", "forget")
LOW_CKA = {"kd": 0.06, "held": 0.0, "alignment-only": 0.08}


def _analysis(gains, seed_sd=0.005, **kw):
    rng = np.random.default_rng(kw.pop("seed", 0))
    table = build(study(rng, gains=gains, methods=HELD, degradations=THREE, seed_sd=seed_sd,
                        delta_cka=LOW_CKA, kl=kw.pop("kl", {"kd": 0.1, "held": 0.12, "alignment-only": 0.4}), **kw))
    return analyze_theta(table, S)


def test_tables_supported():
    a = _analysis({"kd": 0.2, "held": 0.02})
    assert a.verdict.outcome == SUPPORTED, a.verdict.reason
    assert all(c.passed for c in a.checks) and a.theta.pooled.low > 0.5


def test_tables_refuted_by_the_clamp():
    a = _analysis({"kd": 0.2, "held": 0.2})
    assert a.verdict.outcome == REFUTED and a.verdict.rule == REFUTE_CLAMP, a.verdict.reason
    assert a.theta.pooled.high < 0.25


def test_tables_refuted_by_an_arm_that_re_aligns_without_recovering():
    a = _analysis({"kd": 0.2, "held": 0.12, "alignment-only": 0.0}, own_sd=0.05)
    assert a.verdict.outcome == REFUTED and a.verdict.rule == REFUTE_CKA, a.verdict.reason
    assert [e.arm for e in a.arms] == [f"m/{d}/alignment-only" for d in THREE]  # held arms are not tested


def test_tables_inconclusive_and_a_failed_kl_check():
    assert _analysis({"kd": 0.2, "held": 0.12}).verdict.outcome == INCONCLUSIVE
    a = _analysis({"kd": 0.2, "held": 0.02}, kl={"kd": 0.1, "held": 0.45})  # parent 0.5: held left most of it
    assert a.verdict.outcome == INCONCLUSIVE and "did not hold while the outputs matched" in a.verdict.reason


def test_tables_a_point_counterexample_with_wide_seed_spread_does_not_refute():
    # alignment-only: point delta CKA well above half kd's, point gain near 0 -- but its two seeds disagree
    # wildly, so its gain's interval does not exclude a meaningful recovery
    a = _analysis({"kd": 0.2, "held": 0.12, "alignment-only": 0.0},
                  seed_sd={"kd": 0.005, "held": 0.005, "alignment-only": 0.15}, seed=1)
    assert a.verdict.outcome == INCONCLUSIVE, a.verdict.reason
    for e in a.arms:
        assert e.delta_cka_low > e.cka_threshold and e.recovery_ratio_high > S.meaningful_recovery


def test_holm_over_the_arms_tested():
    a = _analysis({"kd": 0.2, "held": 0.12, "alignment-only": 0.1}, own_sd=0.05)
    assert [e.p_holm for e in a.arms] == pytest.approx(holm([e.p for e in a.arms]))
    for e in a.arms:
        assert e.p == max(e.p_cka_rise, e.p_short)
