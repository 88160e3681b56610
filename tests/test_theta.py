"""theta = 1 - gain(held) / gain(kd) (realign.analysis.estimand), its variance components
(realign.analysis.components) and the pooling over damages (realign.analysis.pooling), against independent
computations on constructed tables."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as sps

from realign.analysis.components import Combination, fieller, from_replicates, one_sided_p
from realign.analysis.estimand import pool, theta
from realign.analysis.pooling import random_effects
from theta_tables import Run, build, study

HELD = {"held": "alignment-held"}
Z = sps.norm.ppf(0.975)


def _fieller_by_hand(a, b, w):
    """Fieller's interval of a / b where Var(a - R b) enters as W (the quantile-weighted covariance)."""
    qa, qb, qc = b * b - w[1, 1], a * b - w[0, 1], a * a - w[0, 0]
    half = math.sqrt(qb * qb - qa * qc)
    return (qb - half) / qa, (qb + half) / qa


def _arm_boot(table, arm):
    rows = table[table.recovery.str.split("+").str[0] == arm]
    parent = np.asarray(table[table.recovery == "none"].P_boot.iloc[0])
    return np.mean([np.asarray(b) - parent for b in rows.P_boot], axis=0)


def test_without_seed_variance_theta_is_the_item_bootstrap_interval():
    # Both seeds of an arm score identically on every item: no seed variance, only the items' noise.
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.3, 300)
    parent = difficulty + rng.normal(0, 0.1, 300)
    held_items = difficulty + 0.05 + rng.normal(0, 0.1, 300)
    kd_items = difficulty + 0.20 + rng.normal(0, 0.1, 300)
    runs = [Run("q4", "none", "none", parent)]
    for name, method, items in (("held", "alignment-held", held_items), ("kd", "kd", kd_items)):
        runs += [Run("q4", name, method, items), Run("q4", f"{name}+seed1", method, items.copy())]
    table = build(runs, n_boot=2000, seed=3)
    d = theta(table).damages[0]
    assert d.var_seed == 0 and d.df == math.inf and d.n_seeds_held == d.n_seeds_kd == 2 and d.n_items == 300

    # independent: the bootstrap covariance of the two arms' mean gains, Fieller at the normal quantile
    bh, bk = _arm_boot(table, "held"), _arm_boot(table, "kd")
    cov = np.cov(np.column_stack([bh, bk]), rowvar=False)
    a, b = held_items.mean() - parent.mean(), kd_items.mean() - parent.mean()
    low, high = _fieller_by_hand(a, b, Z * Z * cov)
    assert d.theta == pytest.approx(1 - a / b, abs=1e-12)
    assert (d.low, d.high) == pytest.approx((1 - high, 1 - low), abs=1e-10)
    assert d.var_item == pytest.approx(np.var(bh - (a / b) * bk, ddof=1) / b**2, rel=1e-9)
    # and close to the percentile interval of the replicates' theta (gains far beyond noise: ratio near normal)
    percentile = np.percentile(1 - bh / bk, [2.5, 97.5])
    assert abs(d.low - percentile[0]) < 0.1 * (d.high - d.low)
    assert abs(d.high - percentile[1]) < 0.1 * (d.high - d.low)


def test_without_item_noise_theta_is_welch_fieller():
    # Every item scores the same within an artifact: the bootstrap replicates are constant, only seeds vary.
    gains = {"held": [0.04, 0.08], "kd": [0.20, 0.22]}
    runs = [Run("q4", "none", "none", np.zeros(50))]
    for arm, values in gains.items():
        for s, g in enumerate(values):
            runs.append(Run("q4", arm if s == 0 else f"{arm}+seed{s}", HELD.get(arm, arm), np.full(50, g)))
    d = theta(build(runs)).damages[0]
    a, b = np.mean(gains["held"]), np.mean(gains["kd"])
    r = a / b
    vh, vk = np.var(gains["held"], ddof=1) / 2, np.var(gains["kd"], ddof=1) / 2
    terms = np.array([vh, r * r * vk])
    nu = terms.sum() ** 2 / np.sum(terms**2 / 1)  # Welch-Satterthwaite, 1 df per arm
    t = sps.t.ppf(0.975, nu)
    low, high = _fieller_by_hand(a, b, t * t * np.diag([vh, vk]))
    assert d.var_item == pytest.approx(0, abs=1e-20) and d.df == pytest.approx(nu)
    assert 1 <= d.df <= 2  # two seeds per arm: between one arm's df and the pooled df
    assert (d.low, d.high) == pytest.approx((1 - high, 1 - low), rel=1e-9)
    assert d.var_seed == pytest.approx((vh + r * r * vk) / b**2)
    assert d.var_seed_held == pytest.approx(vh / b**2) and d.var_seed_kd == pytest.approx(r * r * vk / b**2)


def test_the_interval_widens_with_seed_variance():
    widths, seed_vars = [], []
    for seed_sd in (0.0, 0.01, 0.03):
        rng = np.random.default_rng(5)  # the same items and item noise at every seed spread
        table = build(study(rng, gains={"held": 0.06, "kd": 0.2}, methods=HELD, seed_sd=seed_sd, own_sd=0.1))
        d = theta(table).damages[0]
        widths.append(d.high - d.low)
        seed_vars.append(d.var_seed)
    assert widths[0] < widths[1] < widths[2]
    assert seed_vars[0] < seed_vars[1] < seed_vars[2]


def _simulated_coverage(n_sims, seed_sd, own_sd, rng, n=200, n_boot=100, mu=(0.05, 0.2)):
    hits = 0
    for _ in range(n_sims):
        difficulty = rng.normal(0, 0.3, n)
        parent = difficulty + rng.normal(0, own_sd, n)
        idx = rng.integers(0, n, (n_boot, n))
        values, replicates = [], []
        for m in mu:
            arm = [difficulty + m + rng.normal(0, seed_sd) + rng.normal(0, own_sd, n) for _ in range(2)]
            values.append(np.array([x.mean() - parent.mean() for x in arm]))
            replicates.append(np.column_stack([x[idx].mean(1) - parent[idx].mean(1) for x in arm]))
        r = fieller(from_replicates(("held", "kd"), values, replicates), "held", "kd", 0.05)
        hits += r.low <= mu[0] / mu[1] <= r.high
    return hits / n_sims


@pytest.mark.parametrize("seed_sd,own_sd", [(0.0, 0.1), (0.02, 0.1), (0.03, 0.0)])
def test_two_seeds_do_not_understate_the_variance(seed_sd, own_sd):
    # 200 simulated studies with two seeds per arm: the 95% interval covers the true ratio at least about 95% of
    # the time (binomial SE 0.015 at 0.95; measured with 600 tables: 0.97, 0.97, 0.95). A single t quantile with
    # Satterthwaite's df of the whole variance covered 0.91 and 0.89 in the first two settings.
    coverage = _simulated_coverage(200, seed_sd, own_sd, np.random.default_rng([7, int(seed_sd * 100)]))
    assert coverage >= 0.92


def test_combination_interval_and_p_agree():
    c = Combination(0.3, 0.01, 0.02, 1.5)
    low, high = c.interval(0.05)
    half = math.sqrt(Z * Z * 0.01 + sps.t.ppf(0.975, 1.5) ** 2 * 0.02)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    # the one-sided p is the level at which the bound reaches 0
    p = c.p_greater()
    assert Combination(0.3, 0.01, 0.02, 1.5).interval(2 * p)[0] == pytest.approx(0, abs=1e-9)
    assert c.p_less() == pytest.approx(1 - p)
    assert one_sided_p(0.0, 0.01, 0.0, math.inf) == 0.5
    assert one_sided_p(0.2, 0.01, 0.0, math.inf) == pytest.approx(sps.norm.sf(2.0))


def test_dersimonian_laird_by_hand_on_three_numbers():
    y, v = np.array([0.2, 0.5, 0.8]), np.array([0.01, 0.02, 0.04])
    w = 1 / v  # 100, 50, 25
    fixed = (w * y).sum() / w.sum()  # 65 / 175
    assert fixed == pytest.approx(65 / 175)
    q_cochran = (w * (y - fixed) ** 2).sum()
    tau2 = (q_cochran - 2) / (w.sum() - (w**2).sum() / w.sum())  # C = 175 - 13125 / 175 = 100
    assert tau2 == pytest.approx((q_cochran - 2) / 100)
    ws = 1 / (v + tau2)
    mean = (ws * y).sum() / ws.sum()
    q = (ws * (y - mean) ** 2).sum() / 2
    var = max(1.0, q) / ws.sum()
    half = sps.t.ppf(0.975, 2) * math.sqrt(var)

    p = random_effects(y, v, 0.05)
    assert p.cochran_q == pytest.approx(q_cochran) and p.tau2 == pytest.approx(tau2)
    assert p.estimate == pytest.approx(mean) and p.q == pytest.approx(q) and p.var == pytest.approx(var)
    assert (p.low, p.high) == pytest.approx((mean - half, mean + half))
    assert p.df == 2 and p.k == 3 and sum(p.weights) == pytest.approx(1)
    # a zero off-diagonal covariance changes nothing; a positive one widens
    assert random_effects(y, v, 0.05, np.diag(v)).var == pytest.approx(p.var)
    correlated = np.diag(v) + 0.005 * (1 - np.eye(3))
    assert random_effects(y, v, 0.05, correlated).var > p.var


def test_homogeneous_damages_get_no_narrower_than_the_fixed_effect_interval():
    # Three damages that agree by chance: q < 1, and max(1, q) keeps the DL variance.
    y, v = np.array([0.50, 0.51, 0.49]), np.array([0.01, 0.01, 0.01])
    p = random_effects(y, v, 0.05)
    assert p.tau2 == 0 and p.q < 1 and p.var == pytest.approx(1 / (3 / 0.01))


def test_pooled_theta_over_three_damages_and_exclusions():
    rng = np.random.default_rng(11)
    table = build(study(rng, gains={"held": 0.05, "kd": 0.2}, methods=HELD, seed_sd=0.01,
                        degradations=("q4", "prune", "forget")))
    result = theta(table)
    assert [d.degradation for d in result.damages] == ["q4", "prune", "forget"]
    p = result.pooled
    assert p.k == 3 and p.damages == ("m/q4", "m/prune", "m/forget") and not p.excluded
    influence = np.column_stack([d.influence for d in result.damages])
    direct = random_effects([d.theta for d in result.damages], [d.var for d in result.damages], 0.05,
                            np.cov(influence, rowvar=False))
    assert (p.estimate, p.low, p.high) == pytest.approx((direct.estimate, direct.low, direct.high))
    assert 0.5 < p.estimate < 1 and p.low < 0.75 < p.high

    # one damage whose kd arm gains nothing on average: no theta to pool there; one damage left: its own interval
    one = pool((result.damages[0], dataclasses.replace(result.damages[1], gain_kd=-0.01)), 0.05)
    assert one.k == 1 and one.excluded[0][0] == "m/prune" and "not positive" in one.excluded[0][1]
    assert (one.estimate, one.low, one.high) == (result.damages[0].theta, result.damages[0].low,
                                                  result.damages[0].high)


def test_several_held_arms_must_be_named():
    rng = np.random.default_rng(2)
    table = build(study(rng, gains={"held": 0.05, "held-half": 0.1, "kd": 0.2},
                        methods={"held": "alignment-held", "held-half": "alignment-held"}))
    with pytest.raises(ValueError, match="several alignment-held arms"):
        theta(table)
    assert theta(table, held="held-half").damages[0].held == "held-half"


def test_the_held_arm_at_dose_zero_enters_theta():
    """With the doses in the table (hold_fraction, as build_table reads them from artifact.json), the arm that
    holds CKA at the damaged value is theta's; an arm allowed half the rise is a dose arm."""
    rng = np.random.default_rng(2)
    table = build(study(rng, gains={"held": 0.05, "held-half": 0.1, "kd": 0.2},
                        methods={"held": "alignment-held", "held-half": "alignment-held"}))
    doses = {"held": 0.0, "held-half": 0.5}
    table["hold_fraction"] = [doses.get(str(r).split("+")[0], float("nan")) if m == "alignment-held" else float("nan")
                              for r, m in zip(table["recovery"], table["recovery_method"])]
    assert {d.held for d in theta(table).damages} == {"held"}
    table.loc[table["recovery"] == "held+seed1", "hold_fraction"] = 0.25  # one arm, two doses: an error
    with pytest.raises(ValueError, match="disagree on hold_fraction"):
        theta(table)
