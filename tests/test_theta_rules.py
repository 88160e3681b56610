"""Findings 5 and 7 of issue 28: which damages answer, and how their answers combine.

* Finding 5: eligibility is judged per damage on kd and the parent (realign.analysis.theta.eligibility); one
  damage that is ineligible or fails its check does not block another's verdict; the overall verdict
  (realign.analysis.theta.rules.overall) needs two families for "supported" and says "mixed" when damages disagree;
  the per-damage tests are Holm-adjusted and compared with alpha / 2.
* Finding 7: on a damage whose recovery keeps a constraint (quantization, pruning), kd must have changed the damaged
  weights (`changed_fraction` > 0 on every kd run); a record that does not say has not shown it."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from realign.analysis.arms import arms_by_parent
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta import analyze_arms
from realign.analysis.theta.check import PASSED, ArmCheck, CheckPart
from realign.analysis.theta.eligibility import Eligibility
from realign.analysis.theta.estimator import estimate_paired
from realign.analysis.theta.paired import Paired
from realign.analysis.theta.rules import DamageVerdict, damage_verdict, overall
from theta_tables import add_theta_columns, build, study

S = AnalysisSettings.defaults(n_boot=200)
HELD = {"held": "alignment-held"}
FAMILIES = {"q4": "quantization", "prune": "pruning", "forget": "forgetting"}


def _table(arms_by_damage: dict[str, dict], changed=1.0, seed: int = 0) -> pd.DataFrame:
    """One damaged parent per entry (degradation -> {"gains": ..., "delta_cka": ...}), two seeds per arm."""
    rng = np.random.default_rng(seed)
    runs = []
    for degradation, arms in arms_by_damage.items():
        runs += study(rng, gains=arms["gains"], methods=HELD, degradations=(degradation,), seeds=2, seed_sd=0.005,
                      delta_cka=arms.get("delta_cka", {"kd": 0.05, "held": 0.0}), kl={"kd": 0.1, "held": 0.1})
    return add_theta_columns(build(runs, n_boot=300), rng, family=FAMILIES, changed_fraction=changed,
                             cka_boot_sd=0.001)


def test_one_damage_s_failure_does_not_block_another_s_verdict():
    table = _table({"q4": {"gains": {"kd": 0.0, "held": 0.0}},                          # kd recovers nothing
                    "prune": {"gains": {"kd": 0.2, "held": 0.2},                        # the clamp did not hold
                              "delta_cka": {"kd": 0.05, "held": 0.05}},
                    "forget": {"gains": {"kd": 0.2, "held": 0.2}}})                     # held recovers as kd
    a = analyze_arms(arms_by_parent(table), S)
    by = {v.damage: v for v in a.verdict.damages}
    q4 = next(e for e in a.eligibility if e.damage == "m/q4")
    assert not q4.eligible and q4.kd_gain_low <= 0
    assert any("kd's gain" in r and "no lower bound above 0" in r for r in q4.reasons), q4.reasons
    assert by["m/q4"].outcome == "ineligible" and by["m/q4"].reasons == q4.reasons
    assert [t.damage for t in a.theta.damages] == ["m/prune", "m/forget"]  # left out of theta and Holm
    assert (by["m/prune"].outcome, by["m/prune"].h1) == ("check failed", "check failed")
    assert any("delta CKA" in r for r in by["m/prune"].reasons)
    assert (by["m/forget"].outcome, by["m/forget"].h1) == ("refuted", "refuted")
    assert a.verdict.outcome == "refuted" and "m/forget" in a.verdict.reason
    # the verdict box says each damage's outcome in a sentence (issue 31), not the rule's raw string
    assert by["m/q4"].sentence.startswith("m/q4 (") and "not eligible" in by["m/q4"].sentence
    assert "manipulation check failed" in by["m/prune"].sentence and by["m/prune"].sentence.endswith("check failed.")
    assert "cost little of kd's recovery — refuted." in by["m/forget"].sentence
    assert a.verdict.lines == tuple(v.sentence for v in sorted(a.verdict.damages, key=lambda v: v.family))


def _verdict(damage, family, outcome, h1=None):
    return DamageVerdict(damage, family, outcome, (), h1 or outcome, "not tested", "not evaluated")


@pytest.mark.parametrize("verdicts, outcome", [
    ([("a", "quantization", "supported"), ("b", "quantization", "supported")], "inconclusive"),
    ([("a", "quantization", "supported"), ("b", "pruning", "supported")], "supported"),
    ([("a", "quantization", "supported"), ("b", "pruning", "supported"), ("c", "forgetting", "ineligible")],
     "supported"),
    ([("a", "quantization", "supported"), ("b", "quantization", "supported"), ("c", "pruning", "ineligible")],
     "inconclusive"),
    ([("a", "quantization", "supported"), ("b", "pruning", "inconclusive")], "inconclusive"),
    ([("a", "quantization", "supported"), ("b", "pruning", "check failed")], "inconclusive"),
    ([("a", "quantization", "refuted"), ("b", "pruning", "supported")], "mixed"),
    ([("a", "quantization", "refuted"), ("b", "pruning", "inconclusive")], "refuted"),
    ([("a", "quantization", "refuted"), ("b", "pruning", "ineligible")], "refuted"),
    ([("a", "quantization", "ineligible"), ("b", "pruning", "ineligible")], "inconclusive"),
])
def test_the_overall_verdict(verdicts, outcome):
    v = overall([_verdict(*x) for x in verdicts])
    assert v.outcome == outcome, v.reason
    assert len(v.lines) == len(verdicts)  # one sentence per damage
    judged = [o for _, _, o in verdicts if o != "ineligible"]
    if not judged:
        assert v.reason == "no damage is eligible"
    elif outcome == "inconclusive" and all(o == "supported" for o in judged):
        assert "fewer than two families" in v.reason


def test_mixed_when_h1_prime_refutes_where_another_damage_supports():
    refuted_by_only = DamageVerdict("a", "quantization", "refuted", (), "supported", "refuted", "held")
    v = overall([refuted_by_only, _verdict("b", "pruning", "supported")])
    assert v.outcome == "mixed" and "refuted on a" in v.reason and "supported on a, b" in v.reason


def _with_refute_p(p: float, n_seeds: int = 2) -> Paired:
    """Paired gains (held, kd) whose refute test (H0 theta >= 0.25: held - 0.75 kd > 0) has one-sided p exactly
    `p`: kd 0.2 without noise, held 0.15 + z_(1-p) x 0.01 with item replicates of sd exactly 0.01, the same on
    every seed (so the seed covariance is 0, with df n_seeds - 1)."""
    e = np.random.default_rng(0).normal(size=400)
    e = (e - e.mean()) / e.std(ddof=1) * 0.01
    held = 0.75 * 0.2 + stats.norm.ppf(1 - p) * 0.01
    values = np.array([[held, 0.2]] * n_seeds)
    reps = values[None] + np.column_stack([e, np.zeros_like(e)])[:, None, :]
    return Paired(("held", "kd"), tuple(range(n_seeds)), values, reps, 0.2)


def _judge(ps: list[float], n_seeds: int = 2):
    names = [(f"m/d{i}", f"family{i}", "held", "kd", ()) for i in range(len(ps))]
    theta = estimate_paired(names, [_with_refute_p(p, n_seeds) for p in ps], S)
    verdicts = []
    for t in theta.damages:
        e = Eligibility(t.damage, t.family, True, (), 0.3, 0.25, 0.2, 0.1, 0.3, 0.05, 0.04, 0.06, (1.0,))
        parts = (CheckPart("delta_cka", PASSED, True, -0.01, -0.001, 3.0, ""),
                 CheckPart("kl", PASSED, True, -0.05, -0.01, 3.0, ""))
        check = ArmCheck(t.damage, "held", "kd", 0.0, parts)
        verdicts.append(damage_verdict(e, t, check, None, S))
    return theta, overall(verdicts)


def test_holm_across_damages_at_half_alpha():
    theta, verdict = _judge([0.02, 0.02])
    assert [t.p_refute for t in theta.damages] == pytest.approx([0.02, 0.02], abs=1e-6)
    assert [t.p_refute_holm for t in theta.damages] == pytest.approx([0.04, 0.04], abs=1e-6)
    assert [v.outcome for v in verdict.damages] == ["inconclusive", "inconclusive"]
    assert verdict.outcome == "inconclusive"

    theta, verdict = _judge([0.02])  # alone, 0.02 < alpha / 2 = 0.025
    (t,) = theta.damages
    assert t.p_refute_holm == pytest.approx(0.02, abs=1e-6)
    assert verdict.damages[0].outcome == "refuted" and verdict.outcome == "refuted"
    assert t.high < S.theta_refute  # one damage: the two-sided 1 - alpha interval's upper bound below theta_refute

    theta, verdict = _judge([0.03])
    assert verdict.damages[0].outcome == "inconclusive" and theta.damages[0].high > S.theta_refute

    theta, _ = _judge([0.001, 0.02, 0.02])  # Holm: 3 x 0.001, 2 x 0.02, max(0.04, 0.02)
    assert [t.p_refute_holm for t in theta.damages] == pytest.approx([0.003, 0.04, 0.04], abs=1e-6)


def test_one_seed_per_arm_decides_nothing():
    """An interval of items alone (one training seed per arm: the seeds' variance unmeasured) does not decide H1,
    even where its p is below alpha / 2, and says why; the same p with two paired seeds decides."""
    theta, verdict = _judge([0.001], n_seeds=1)
    (t,) = theta.damages
    assert t.p_refute_holm == pytest.approx(0.001, abs=1e-6) and not t.seed_variance_measured
    (v,) = verdict.damages
    assert (v.outcome, v.h1, verdict.outcome) == ("inconclusive", "inconclusive", "inconclusive")
    assert any("one seed per arm" in r for r in v.reasons) and "cannot decide" in v.sentence
    theta, verdict = _judge([0.001], n_seeds=2)
    assert theta.damages[0].seed_variance_measured and verdict.outcome == "refuted"


def test_h1_prime_needs_the_seeds_variance_too():
    """H1' on one seed per arm is "not tested", with its reason; on two seeds it is tested."""
    for seeds, tested in [(1, False), (2, True)]:
        rng = np.random.default_rng(3)
        runs = study(rng, gains={"kd": 0.2, "held": 0.2, "only": 0.0}, methods={**HELD, "only": "alignment-only"},
                     degradations=("prune",), seeds=seeds, seed_sd=0.005,
                     delta_cka={"kd": 0.05, "held": 0.0, "only": 0.08}, kl={"kd": 0.1, "held": 0.1, "only": 0.3})
        table = add_theta_columns(build(runs, n_boot=300), rng, family=FAMILIES, changed_fraction=1.0,
                                  cka_boot_sd=0.001)
        a = analyze_arms(arms_by_parent(table), S)
        (only,) = a.only
        (v,) = a.verdict.damages
        assert only.seed_variance_measured is tested
        assert (v.h1prime != "not tested") is tested, v.reasons
        assert any("H1' (" in r and ("not tested" in r) is not tested for r in v.reasons), v.reasons


def _changed(table: pd.DataFrame, degradation: str, values) -> pd.DataFrame:
    """Set changed_fraction of the kd runs of `degradation` (one value per run, in table order)."""
    t = table.copy()
    rows = (t["degradation"] == degradation) & (t["recovery_method"] == "kd")
    t.loc[rows, "changed_fraction"] = values
    return t


GOOD = {"gains": {"kd": 0.2, "held": 0.2}}


@pytest.mark.parametrize("values, eligible, reason", [
    ([0.0, 0.0], False, "changed none of the targeted values"),
    ([0.4, 0.0], False, "changed none of the targeted values"),   # every kd run must show it
    ([math.nan, math.nan], False, "does not show"),
    ([0.4, math.nan], False, "does not show"),
    ([0.4, 0.3], True, None),
])
@pytest.mark.parametrize("degradation", ["q4", "prune"])
def test_kd_must_have_changed_the_damaged_weights(values, eligible, reason, degradation):
    table = _changed(_table({degradation: GOOD, "forget": GOOD}), degradation, values)
    a = analyze_arms(arms_by_parent(table), S)
    e = next(e for e in a.eligibility if e.damage == f"m/{degradation}")
    assert e.eligible is eligible, e.reasons
    if reason is None:
        assert not any("changed" in r or "does not show" in r for r in e.reasons)
    else:
        assert any(reason in r for r in e.reasons), e.reasons
        assert next(v for v in a.verdict.damages if v.damage == e.damage).outcome == "ineligible"
    forget = next(e for e in a.eligibility if e.damage == "m/forget")
    assert forget.eligible, forget.reasons  # the other damage keeps its own verdict


def test_forgetting_keeps_no_constraint():
    table = _changed(_table({"forget": GOOD}, changed=math.nan), "forget", [0.0, math.nan])
    (e,) = analyze_arms(arms_by_parent(table), S).eligibility
    assert e.family == "forgetting" and e.eligible, e.reasons
