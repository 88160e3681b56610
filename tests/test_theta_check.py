"""Findings 2, 3 and 4 of issue 28: the manipulation check and the power simulation.

* Finding 2: the per-arm check (realign.analysis.theta.check) reads the arm's mean, so a perfectly clamped held arm
  passes it with high probability at moderate probe noise, and adding a seed never lowers that probability.
* Finding 3: the H2 parts (RBF CKA, Procrustes, k-NN) have no margin of their own and are never required: one that
  fails leaves H1's check passed and makes H2 "not tested by this intervention".
* Finding 4: the power simulation (realign.analysis.theta.power) reproduces the study's own theta half-widths at
  its measured noise, and more items never lower its refute power."""

import functools
import math

import numpy as np
import pytest

from realign.analysis.arms import OTHER_SIMILARITY, arms_by_parent
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta import analyze_arms, power
from realign.analysis.theta.check import FAILED, NOT_EVALUATED, PASSED, ArmCheck, CheckPart, required_parts
from realign.analysis.theta.eligibility import Eligibility
from realign.analysis.theta.estimator import ThetaDamage
from realign.analysis.theta.paired import Paired
from realign.analysis.theta.rules import damage_verdict
from theta_tables import add_theta_columns, build, study

S = AnalysisSettings.defaults(n_boot=200)
REVIEW_PROBE_SE = 0.0077  # the review's probe noise of delta CKA (forgetting)
MODERATE_PROBE_SE = 0.0015
KD_CKA = 0.02
N_SIMS = 400


def _paired(names, true, probe_cov, seed_sd, n_seeds, rng, scale, n_boot=200) -> Paired:
    """Parametric paired runs: values[s] = true + the probe set's error (shared by every seed) + a seed effect;
    rep[b, s, :] = values[s] + eta_b, eta drawn once per replicate for every seed (one probe set)."""
    a = len(true)
    values = true + rng.multivariate_normal(np.zeros(a), probe_cov) + rng.normal(0.0, seed_sd, (n_seeds, a))
    eta = rng.multivariate_normal(np.zeros(a), probe_cov, size=n_boot)
    return Paired(tuple(names), tuple(range(n_seeds)), values, values[None] + eta[:, None, :], scale)


@functools.cache
def _pass_rate(probe_se: float, seed_sd: float, n_seeds: int, n_damages: int = 1, rho: float = 0.5) -> float:
    """The rate at which a perfectly clamped held arm (true delta CKA 0, dose 0; KL equal to kd's) passes the CKA
    and KL parts of the first damage's check; n_damages such damages pool their seed covariance."""
    rng = np.random.default_rng(28)
    cka_cov = probe_se**2 * np.array([[1.0, rho], [rho, 1.0]])
    kl_cov = 0.002**2 * np.eye(3)
    passed = 0
    for _ in range(N_SIMS):
        ckas = [_paired(("held", "kd"), np.array([0.0, KD_CKA]), cka_cov, seed_sd, n_seeds, rng, KD_CKA)
                for _ in range(n_damages)]
        kls = [_paired(("held", "kd", "parent"), np.array([0.1, 0.1, 0.5]), kl_cov, 0.002, n_seeds, rng, 0.4)
               for _ in range(n_damages)]
        cka, kl = required_parts(ckas, kls, [0.0] * n_damages, S)[0]
        passed += cka.status == PASSED and kl.status == PASSED
    return passed / N_SIMS


@pytest.mark.parametrize("n_seeds", [2, 3, 4])
def test_a_clamped_arm_passes_at_moderate_probe_noise(n_seeds):
    assert _pass_rate(MODERATE_PROBE_SE, 0.0, n_seeds) >= 0.8
    if n_seeds >= 3:  # with seed noise too, from three seeds on
        assert _pass_rate(MODERATE_PROBE_SE, 0.001, n_seeds) >= 0.8


@pytest.mark.parametrize("seed_sd, n_damages", [(0.001, 1), (0.002, 1), (0.002, 3)])
def test_adding_a_seed_never_lowers_a_clamped_arm_s_pass_rate(seed_sd, n_damages):
    rates = [_pass_rate(MODERATE_PROBE_SE, seed_sd, s, n_damages) for s in (2, 3, 4)]
    assert rates[1] >= rates[0] - 0.02 and rates[2] >= rates[1] - 0.02, rates


def test_probe_noise_not_seeds_limits_the_check():
    """At the review's probe noise a clamped arm passes rarely whatever the seeds (the probe part is shared by the
    seeds); fewer probe errors (more probe sequences) make it pass."""
    at_review = [_pass_rate(REVIEW_PROBE_SE, 0.0, s) for s in (2, 4)]
    assert max(at_review) < 0.3 and abs(at_review[0] - at_review[1]) <= 0.02
    rates = [_pass_rate(REVIEW_PROBE_SE / k, 0.0, 2) for k in (1, 2, 4, 8)]
    assert all(b >= a - 0.02 for a, b in zip(rates, rates[1:])) and rates[-1] >= 0.95, rates


def _part(name, status, required, upper):
    return CheckPart(name, status, required, -0.01, upper, 3.0, f"{name}: {status}")


def test_an_h2_part_that_fails_does_not_fail_the_check():
    parts = (_part("delta_cka", PASSED, True, -0.001), _part("kl", PASSED, True, -0.02),
             _part(OTHER_SIMILARITY[0], FAILED, False, 0.03), _part(OTHER_SIMILARITY[1], PASSED, False, -0.01),
             _part(OTHER_SIMILARITY[2], NOT_EVALUATED, False, math.nan))
    check = ArmCheck("m/q4", "held", "kd", 0.0, parts)
    assert check.passed and check.failures == ()
    assert check.h2.startswith("not tested by this intervention") and OTHER_SIMILARITY[0] in check.h2
    assert OTHER_SIMILARITY[1] not in check.h2
    # every H2 part passing: H2 held; a required part failing fails the check whatever H2 says
    held = ArmCheck("m/q4", "held", "kd", 0.0, parts[:2] + tuple(_part(m, PASSED, False, -0.01)
                                                                 for m in OTHER_SIMILARITY))
    assert held.passed and held.h2 == "held"
    failed = ArmCheck("m/q4", "held", "kd", 0.0, (_part("delta_cka", FAILED, True, 0.01),) + parts[1:])
    assert not failed.passed and [p.name for p in failed.failures] == ["delta_cka"]

    # the verdict reads H1 through the check's required parts only
    e = Eligibility("m/q4", "quantization", True, (), 0.3, 0.25, 0.2, 0.1, 0.3, 0.05, 0.04, 0.06, (1.0,))
    t = ThetaDamage("m/q4", "quantization", "held", "kd", (0, 1), (), 0.2, 0.2, 0.0, -0.05, 0.05, True, 0.95,
                    0.001, 0.001, 3.0, 0.001, 1.0, 0.001, 1.0)
    v = damage_verdict(e, t, check, None, S)
    assert (v.outcome, v.h1) == ("refuted", "refuted") and v.h2 == check.h2
    v = damage_verdict(e, t, failed, None, S)
    assert (v.outcome, v.h1) == ("check failed", "check failed")


def test_the_h2_parts_of_a_study_are_never_required():
    rng = np.random.default_rng(3)
    runs = study(rng, gains={"kd": 0.2, "held": 0.2}, methods={"held": "alignment-held"}, seeds=2,
                 delta_cka={"kd": 0.05, "held": 0.0}, kl={"kd": 0.1, "held": 0.1})
    t = add_theta_columns(build(runs, n_boot=200), rng, cka_boot_sd=0.001)
    for m in OTHER_SIMILARITY:  # held's measures rise as much as kd's: H2's clamp does not hold
        t[f"{m}_mean"] = np.where(t["recovery"] == "none", 0.5, 0.6)
    a = analyze_arms(arms_by_parent(t), S)
    (check,) = a.checks
    assert {p.name for p in check.parts if not p.required} == set(OTHER_SIMILARITY)
    assert {p.name for p in check.parts if p.required} == {"delta_cka", "kl"}
    assert check.passed and a.verdict.damages[0].outcome == "refuted", a.verdict.reason


def _power_study(seed: int = 0):
    """Two seeds, three damages; item noise per arm shared by its runs, a seed effect per run."""
    rng = np.random.default_rng(seed)
    runs = study(rng, gains={"kd": 0.2, "held": 0.1}, methods={"held": "alignment-held"},
                 degradations=("q4", "prune", "forget"), seeds=2, seed_sd=0.01, arm_item_sd=0.1,
                 delta_cka={"kd": 0.05, "held": 0.0}, kl={"kd": 0.1, "held": 0.1})
    return arms_by_parent(add_theta_columns(build(runs, n_boot=300), rng, cka_boot_sd=0.002))


def test_the_power_simulation_reproduces_the_observed_half_widths():
    out = power.study_power(_power_study(), S, n_tables=100, grid=False)
    assert out["design"]["n_seeds"] == 2 and len(out["validation"]) == 3
    for v in out["validation"]:
        assert 0.75 <= v["ratio"] <= 1.25 and v["within_tolerance"], v
    assert out["validated"]


def test_more_items_never_lower_refute_power():
    """Where item noise matters (fewer items, a smaller gain, little seed noise): refute power at theta 0 with the
    item covariance divided by 1, 2 and 8 (the same random stream for each)."""
    rng = np.random.default_rng(5)
    runs = study(rng, gains={"kd": 0.08, "held": 0.08}, methods={"held": "alignment-held"},
                 degradations=("q4", "prune", "forget"), seeds=2, n_items=100, own_sd=0.03, seed_sd=0.002,
                 arm_item_sd=0.2, delta_cka={"kd": 0.05, "held": 0.0}, kl={"kd": 0.1, "held": 0.1})
    noise = power.measured_noise(arms_by_parent(add_theta_columns(build(runs, n_boot=300), rng,
                                                                  cka_boot_sd=0.001)), S)
    refute = [power._simulate(noise, 0.0, 2, items, 1, 150, S, np.random.default_rng(1))["refute"]
              for items in (1, 2, 8)]
    for fewer, more in zip(refute, refute[1:]):
        assert (more >= fewer - 0.05).all(), refute
    assert (refute[-1] > refute[0] + 0.3).all(), refute  # item noise did limit it here


def test_the_sizing_grid_is_the_one_given_and_prices_each_cell():
    """A pilot passes its own grid and job costs; the check's pass rate is reported per cell, and a design that
    must also pass the check is never cheaper than one that need not."""
    costs = power.JobCosts(train=100.0, divergence=20.0, per_items=80.0, activations=30.0, similarity=10.0)
    grid = power.Grid(seeds=(2, 4), items=(1,), probes=(1, 4))
    out = power.study_power(_power_study(), S, n_tables=40, grid=grid, per_cell=20, costs=costs)
    assert [(r["n_seeds"], r["items"], r["probes"]) for r in out["grid"]] == [(2, 1, 1), (2, 1, 4), (4, 1, 1),
                                                                               (4, 1, 4)]
    assert out["n_per_cell"] == 20 and out["job_costs"]["similarity"] == 10.0
    r = out["grid"][1]
    assert r["job_seconds"] == 3 * 3 * 2 * (100 + 20 + 80 * 1 + 30 * 4 + 10 * 4 ** 2)  # similarity: n x n
    assert all(0 <= c <= 1 for row in out["grid"] for c in row["check_power"])
    with_check = power.study_power(_power_study(), S, n_tables=40, grid=grid, per_cell=20, costs=costs,
                                   require_check=True)
    if with_check["budget"] is not None:
        assert out["budget"] is not None and with_check["budget"]["job_seconds"] >= out["budget"]["job_seconds"]
        assert min(with_check["budget"]["check_power"]) >= power.POWER_TARGET
    # the budget is the grid's cheapest deciding row at these costs, as the report re-prices it at others
    assert out["require_check"] is False
    assert out["budget"] == power.cheapest_deciding(out["grid"], 3, costs)


def _row(n_seeds, items, probes, power):
    return {"n_seeds": n_seeds, "items": items, "probes": probes, "refute_power": [power, power],
            "support_power": [power, power], "check_power": [0.5, 0.5]}


def test_the_cheapest_deciding_design_depends_on_what_a_job_costs():
    """The same powers priced at two studies' job times: where similarity is cheap the bigger probe wins, where it
    grows dear (x probes squared) more seeds at the study's own probe win; a row below the target never decides."""
    rows = [_row(8, 1, 1, 0.85), _row(4, 1, 4, 0.82), _row(2, 1, 1, 0.79)]
    cheap = power.JobCosts(train=100.0, divergence=20.0, per_items=80.0, activations=10.0, similarity=5.0)
    dear = power.JobCosts(train=100.0, divergence=20.0, per_items=80.0, activations=90.0, similarity=300.0)
    at_cheap = power.cheapest_deciding(rows, 2, cheap)
    at_dear = power.cheapest_deciding(rows, 2, dear)
    assert (at_cheap["n_seeds"], at_cheap["probes"]) == (4, 4)
    assert at_cheap["job_seconds"] == 2 * 3 * 4 * (100 + 20 + 80 + 10 * 4 + 5 * 16)
    assert (at_dear["n_seeds"], at_dear["probes"]) == (8, 1)
    assert at_dear["job_seconds"] == 2 * 3 * 8 * (100 + 20 + 80 + 90 + 300)
    assert power.cheapest_deciding(rows, 2, dear, require_check=True) is None  # no row's check reaches 0.8
    assert power.cheapest_deciding(rows[2:], 2, cheap) is None


def test_job_costs_from_a_study_s_own_job_means_keep_the_default_where_a_rule_has_none():
    costs = power.JobCosts.from_job_means({"recover": 87.0, "evaluate": 82.0, "similarity": 290.0,
                                           "activations": float("nan"), "divergence": None, "report": 3.0})
    assert (costs.train, costs.per_items, costs.similarity) == (87.0, 82.0, 290.0)
    assert costs.activations == power.SECONDS_ACTIVATIONS and costs.divergence == power.SECONDS_DIVERGENCE
    assert power.JobCosts.from_job_means({}) == power.JobCosts()
