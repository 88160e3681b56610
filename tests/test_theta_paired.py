"""Finding 1 of issue 28: held and kd runs with one training seed see the same data order, so they are a pair.

realign.analysis.theta pairs the arms by seed (realign.analysis.theta.paired): a seed effect both arms share
cancels in theta's pivot g_held,s - R g_kd,s instead of entering twice as independent noise. Checked on
constructed studies (tests/theta_tables.py) and, for the two building blocks (the shared covariance of distinct
seeds, Fieller's interval), against brute force."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from realign.analysis.arms import arms_by_parent
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta import analyze_arms
from realign.analysis.theta.paired import Paired, SeedCovariance, pool_seed_covariance
from theta_tables import add_theta_columns, build, study

S = AnalysisSettings.defaults(n_boot=200)
DAMAGES = ("q4", "prune", "forget")
HELD = {"held": "alignment-held"}


def _table(seed: int, held_gain: float, *, identical: bool = False):
    """Three damages, three seeds per arm; seed s adds the same large u_s (sd 0.05) to held's and kd's per-item
    scores, item noise is small (own sd 0.02 on 400 items). identical: held's run of seed s *is* kd's (P, P_boot)."""
    rng = np.random.default_rng(seed)
    runs = study(rng, gains={"kd": 0.2, "held": held_gain}, methods=HELD, degradations=DAMAGES, seeds=3,
                 own_sd=0.02, shared_seed_sd=0.05, delta_cka={"kd": 0.05, "held": 0.0}, kl={"kd": 0.1, "held": 0.1})
    t = add_theta_columns(build(runs, n_boot=300), rng, cka_boot_sd=0.001)
    if identical:
        for i in t.index[t["recovery"].str.startswith("held")]:
            j = t.index[(t["degradation"] == t.at[i, "degradation"])
                        & (t["recovery"] == t.at[i, "recovery"].replace("held", "kd"))][0]
            t.at[i, "P"], t.at[i, "P_boot"] = t.at[j, "P"], t.at[j, "P_boot"]
    return t


def _unpaired(analysis) -> list[tuple[float, float]]:
    """theta's Fieller interval per damage on the same data with the pooled seed covariance's held-kd term set to
    0: seed noise treated as independent across arms (what an unpaired analysis assumes)."""
    gains = [d.gains(("held", "kd")) for d in analysis.damages]
    pooled = pool_seed_covariance(gains)
    independent = SeedCovariance(np.diag(np.diag(pooled.cov)), pooled.df)
    out = []
    for g in gains:
        r = g.ratio("held", "kd", independent, S.alpha)
        out.append((1 - r.high, 1 - r.low))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_seed_effect_both_arms_share_cancels_in_theta(seed):
    a = analyze_arms(arms_by_parent(_table(seed, held_gain=0.15)), S)  # true theta 0.25
    assert all(e.eligible for e in a.eligibility), [e.reasons for e in a.eligibility]
    assert len(a.theta.damages) == 3
    for t, (low, high) in zip(a.theta.damages, _unpaired(a)):
        assert t.bounded and t.seeds == (0, 1, 2)
        assert t.low < 0.25 < t.high
        assert (t.high - t.low) < 0.5 * (high - low), (t.damage, (t.low, t.high), (low, high))


@pytest.mark.parametrize("seed", [0, 1])
def test_held_equal_to_kd_up_to_item_noise_gives_theta_tight_around_0(seed):
    a = analyze_arms(arms_by_parent(_table(seed, held_gain=0.2)), S)
    for t, (low, high) in zip(a.theta.damages, _unpaired(a)):
        assert t.low < 0 < t.high and t.high - t.low < 0.05, (t.damage, t.low, t.high)
        assert high - low > 0.3  # the seed effect is large: unpaired, it would swamp theta
    summary = a.theta.summary
    assert summary.bounded and summary.low < 0 < summary.high and summary.high - summary.low < 0.03
    assert a.verdict.outcome == "refuted", a.verdict.reason


def test_held_identical_to_kd_per_seed_gives_theta_0_exactly():
    a = analyze_arms(arms_by_parent(_table(0, held_gain=0.2, identical=True)), S)
    assert len(a.theta.damages) == 3
    for t in a.theta.damages:
        assert t.bounded and abs(t.theta) < 1e-9 and abs(t.low) < 1e-9 and abs(t.high) < 1e-9
    # the fixed-effect summary of damages whose pivots have no noise at all: 0, bounded, weighted by kd's gain
    summary = a.theta.summary
    assert summary.bounded and abs(summary.theta) < 1e-9 and abs(summary.low) < 1e-9 and abs(summary.high) < 1e-9


def _random_paired(rng, n_seeds: int, names=("held", "kd"), scale: float = 1.0, n_boot: int = 300,
                   value_sd: float = 0.03) -> Paired:
    a = len(names)
    values = np.array([0.1, 0.2, 0.05][:a]) + rng.normal(0.0, value_sd, (n_seeds, a))
    mix = rng.normal(0.0, 0.01, (a, a))
    shared = rng.normal(0.0, 1.0, (n_boot, a)) @ mix  # correlated across arms, shared by seeds
    own = rng.normal(0.0, 0.004, (n_boot, n_seeds, a))  # each run's own resampling noise
    return Paired(tuple(names), tuple(range(n_seeds)), values, values[None] + shared[:, None, :] + own, scale)


@pytest.mark.parametrize("n_seeds", [1, 2, 4])
def test_shared_covariance_is_the_mean_covariance_of_distinct_seeds(n_seeds):
    p = _random_paired(np.random.default_rng(n_seeds), n_seeds, names=("held", "kd", "parent"))
    reps = p.replicates
    pairs = [(s, s) for s in range(n_seeds)] if n_seeds == 1 else \
        [(s, u) for s, u in itertools.product(range(n_seeds), repeat=2) if s != u]
    brute = np.zeros((3, 3))
    for s, u in pairs:
        for i, j in itertools.product(range(3), repeat=2):
            brute[i, j] += np.cov(reps[:, s, i], reps[:, u, j], ddof=1)[0, 1]
    np.testing.assert_allclose(p.shared_covariance(), brute / len(pairs), rtol=1e-10, atol=1e-15)
    if n_seeds > 1:  # each run's own noise (sd 0.004) is left out: the shared part alone
        own = np.einsum("bsi,bsj->ij", reps - reps.mean(0), reps - reps.mean(0)) / (len(reps) - 1) / n_seeds
        assert np.trace(p.shared_covariance()) < np.trace(own)


def _fieller_brute(p: Paired, num: str, den: str, seed: SeedCovariance, alpha: float, offset: dict,
                   grid: np.ndarray) -> np.ndarray:
    """The R of `grid` with (a - R b)^2 <= z^2 I(R) + t^2 V_seed(R): I from the distinct-seed covariance, V_seed
    from the pooled covariance in units of scale, times scale^2 / S."""
    z = stats.norm.ppf(1 - alpha / 2)
    t = stats.t.ppf(1 - alpha / 2, seed.df)
    base = np.zeros(len(p.names))
    base[p.names.index(num)] += 1.0
    for name, w in offset.items():
        base[p.names.index(name)] += w
    c = np.repeat(base[None], grid.size, 0)  # one pivot per R of the grid
    c[:, p.names.index(den)] -= grid
    lhs = (c @ p.means) ** 2
    quad = lambda m: np.einsum("ri,ij,rj->r", c, m, c)  # noqa: E731
    rhs = z * z * quad(p.shared_covariance()) + t * t * quad(seed.cov) * p.scale**2 / p.n_seeds
    return grid[lhs <= rhs]


@pytest.mark.parametrize("case", range(6))
def test_fieller_ratio_is_the_set_of_r_not_rejected(case):
    rng = np.random.default_rng(100 + case)
    names = ("held", "kd", "parent")
    p = _random_paired(rng, n_seeds=2 + case % 3, names=names, scale=0.1 + 0.05 * case, value_sd=0.004)
    seed = pool_seed_covariance([p])
    offset = {"parent": -0.3} if case % 2 else {}
    r = p.ratio("held", "kd", seed, 0.05, offset)
    grid = np.linspace(r.estimate - 3, r.estimate + 3, 60001)
    accepted = _fieller_brute(p, "held", "kd", seed, 0.05, offset, grid)
    step = grid[1] - grid[0]
    assert r.bounded and accepted.size
    assert abs(accepted.min() - r.low) <= step and abs(accepted.max() - r.high) <= step
    # contiguous: every grid point between the ends is accepted
    assert accepted.size == pytest.approx((r.high - r.low) / step, abs=2)
    assert r.low < r.estimate < r.high


def test_fieller_ratio_is_unbounded_when_the_denominator_is_not_distinguishable_from_0():
    rng = np.random.default_rng(7)
    p = _random_paired(rng, n_seeds=3)
    p = Paired(p.names, p.seeds, p.values - np.array([0.0, p.means[1] - 0.002]), p.replicates, 1.0)
    seed = pool_seed_covariance([p])
    r = p.ratio("held", "kd", seed, 0.05)
    assert not r.bounded and r.low == -math.inf and r.high == math.inf
    far = _fieller_brute(p, "held", "kd", seed, 0.05, {}, np.array([-1e4, 1e4]))
    assert far.size == 2  # no R, however far, is rejected
