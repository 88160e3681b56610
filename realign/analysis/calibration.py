"""Calibration of the verdicts by simulation.

* The correlational verdict (realign.analysis.verdict): its rate of "supported" on synthetic tables with a planted
  effect (power) and with none (false positives): :func:`simulate_calibration`.
* The pre-registered verdict on theta (realign.analysis.preregistered): its outcomes on simulated studies with
  item-level, seed-level and shared-parent noise of given sizes, for scenarios that reach each of its rules and
  their nulls: :func:`simulate_theta_verdict`. See tests/test_calibration.py.
* The study's own power (:func:`study_power`): that simulation at the noise, intervention and design measured on
  the study's table, and the budget (damaged parents, seeds, items) at which it would reach POWER_TARGET."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats as sps

from realign.analysis.arms import HELD_METHOD, KD_METHOD, Arm, Arms, Parent, arms_by_parent, held_kd_pairs
from realign.analysis.preregistered import INCONCLUSIVE, REFUTED, SUPPORTED, analyze_arms
from realign.analysis.settings import AnalysisSettings
from realign.analysis.stats import analyze
from realign.analysis.table import NLL_NOISE_NATS, _within_noise

# The simulation's bootstrap replicates and permutations per table when no settings are passed: fewer than the
# schema's defaults, so that hundreds of tables stay affordable.
SIMULATION_RESAMPLES = 500


def synthetic_table(n_artifacts: int, effect: float, rng: np.random.Generator, *, kl_corr: float = -0.5,
                    families: tuple[str, ...] = ("quantization", "pruning", "forgetting")) -> pd.DataFrame:
    """A synthetic analysis table of ``n_artifacts`` recovered artifacts (one base model, one damaged parent
    each), with the columns realign.analysis.stats.analyze reads, on the scales of the default study.

    * ``delta_cka`` = 0.01 + 0.09 u, u ~ U(0, 1): every arm raises CKA by 0.01-0.10 (the default study moved
      mean CKA 0.80 -> 0.84-0.88). Always > 0, so no artifact is a counterexample by construction, under the
      null too: the null's "supported" rate is then not lowered by counterexample refutations.
    * ``delta_kl`` = -1.5 + 0.4 (kl_corr z + sqrt(1 - kl_corr^2) e): KL falls as CKA rises (z = standardised
      u, e ~ N(0, 1); correlation kl_corr with delta_cka), so geometry and output matching are confounded as in
      real recoveries and the OLS must separate them.
    * ``recovery_fraction`` = 0.5 + 0.3 (effect z + sqrt(1 - effect^2) e'): linear in delta_cka, population
      Pearson correlation ``effect`` with it; ``effect = 0`` is the null (no relation to delta_cka or delta_kl).
    * damage 0.15 with P standard errors 0.01 (beyond noise); ``gain_within_noise`` by the rule of
      :mod:`realign.analysis.table` (gain = recovery_fraction x damage).
    """
    n = n_artifacts
    u = rng.uniform(0.0, 1.0, n)
    z = (u - 0.5) / math.sqrt(1 / 12)
    delta_kl = -1.5 + 0.4 * (kl_corr * z + math.sqrt(1 - kl_corr**2) * rng.normal(size=n))
    rf = 0.5 + 0.3 * (effect * z + math.sqrt(1 - effect**2) * rng.normal(size=n))
    damage, se = 0.15, 0.01
    gain = rf * damage
    return pd.DataFrame({
        "model": "sim",
        "degradation": [f"d{i}" for i in range(n)],
        "recovery": "kd",
        "family": [families[i % len(families)] for i in range(n)],
        "recovery_method": "kd",
        "checkpoint": False,
        "performance_metric": "bench_mean",
        "damage": damage,
        "gain": gain,
        "delta_cka": 0.01 + 0.09 * u,
        "delta_kl": delta_kl,
        "recovery_fraction": rf,
        "damage_within_noise": bool(_within_noise(np.array([damage]), se, se, "stderr", NLL_NOISE_NATS)[0]),
        "gain_within_noise": _within_noise(gain, np.full(n, se), np.full(n, se), "stderr", NLL_NOISE_NATS),
    })


def simulate_calibration(n_artifacts: int, effect: float, n_sims: int, settings: AnalysisSettings | None = None,
                         **overrides) -> dict:
    """Run realign.analysis.stats.analyze on ``n_sims`` tables from :func:`synthetic_table` and count the
    verdicts. ``settings`` (the schema's defaults with SIMULATION_RESAMPLES bootstrap replicates and
    permutations when None; ``overrides`` replace its fields) give the verdict's thresholds, and their seed
    the simulation's: each table's analysis gets its own seed drawn from it.

    Returns n_artifacts, effect, n_sims, alpha, min_effect, true_spearman (the population Spearman of delta_cka
    with recovery fraction under this generator, from one 200 000-row draw), counts {supported, refuted,
    inconclusive}, supported_rate, refuted_rate, inconclusive_rate, supported_rate_se (binomial
    sqrt(p (1 - p) / n_sims)). Deterministic in the seed.
    """
    if settings is None:
        settings = AnalysisSettings.defaults(n_boot=SIMULATION_RESAMPLES, n_perm=SIMULATION_RESAMPLES)
    settings = settings.replace(**overrides)
    seed = settings.seed
    rng = np.random.default_rng(seed)
    big = synthetic_table(200_000, effect, np.random.default_rng([seed, 1]))
    true_rho = float(sps.spearmanr(big["delta_cka"], big["recovery_fraction"])[0])
    counts = {"supported": 0, "refuted": 0, "inconclusive": 0}
    for _ in range(n_sims):
        table = synthetic_table(n_artifacts, effect, rng)
        out = analyze(table, settings.replace(seed=int(rng.integers(2**31))))
        counts[out["verdict"]] += 1
    rate = {k: v / n_sims for k, v in counts.items()}
    return {"n_artifacts": n_artifacts, "effect": effect, "n_sims": n_sims, "alpha": settings.alpha,
            "min_effect": settings.min_effect, "true_spearman": true_rho, "counts": counts,
            "supported_rate": rate["supported"], "refuted_rate": rate["refuted"],
            "inconclusive_rate": rate["inconclusive"],
            "supported_rate_se": math.sqrt(rate["supported"] * (1 - rate["supported"]) / n_sims)}


# ---- Calibration of the pre-registered theta verdict (realign.analysis.preregistered) -------------------------
#
# Each simulated study draws, for every damaged parent, the noise the real study has: item-level (each artifact's
# own evaluation noise, and the damaged parent's, which every gain on that parent shares), seed-level (training
# runs of one arm differ), and shared-parent (every arm on one damaged parent shares a deviation of its true gain:
# one parent is one draw of a damage). Its arms are built as realign.analysis.arms builds them from a table, so
# the same code computes theta, the manipulation checks, the per-arm tests and the verdict.


@dataclass(frozen=True)
class NoiseSizes:
    """The noise of a study in the units of its primary measure (gains) and of delta CKA and KL: per artifact,
    the item-level standard error of its own P (item_se), of its delta CKA (cka_se: probe sequences) and its KL
    (kl_se); between the seeds of an arm, the SD of a run's true gain (seed_sd), delta CKA (cka_seed_sd) and KL
    (kl_seed_sd); between damaged parents, the SD of a deviation shared by every arm's gain on one parent
    (parent_sd). Inputs here; measured on a pilot or the study itself by :meth:`from_table`."""
    item_se: float
    seed_sd: float
    parent_sd: float
    cka_se: float = 0.003
    cka_seed_sd: float = 0.003
    kl_se: float = 0.002
    kl_seed_sd: float = 0.005

    @classmethod
    def from_table(cls, table: pd.DataFrame, parent_sd: float = 0.0) -> NoiseSizes:
        """Sizes measured on an analysis table with replicated arms: item_se from the gains' item-bootstrap SD
        (a gain holds two artifacts' own noise: / sqrt 2); seed_sd from the pooled between-seed variance of the
        gains less the item part (method of moments, floored at 0); cka_se from the delta CKA intervals' width;
        kl_se from kl_stderr; cka_seed_sd and kl_seed_sd alike. parent_sd is not separable from real differences
        between damages in one table: an input (0: none)."""
        arms = [a for on_parent in arms_by_parent(table).values() for a in on_parent]
        if not any(a.n_seeds >= 2 for a in arms):
            raise ValueError("NoiseSizes.from_table: no arm with two seeds, so seed variance cannot be measured")
        gains = [a.gains() for a in arms]
        item_se = float(np.median([np.std(b, axis=0, ddof=1).mean() for _, b in gains]) / math.sqrt(2))
        cka_se = float(np.nanmedian(np.concatenate([(a.delta_cka_ci_high - a.delta_cka_ci_low) / (2 * 1.959964)
                                                    for a in arms])))
        kl_se = float(np.nanmedian(np.concatenate([a.kl_stderr for a in arms])))

        def between(values: list[np.ndarray], own: float) -> float:
            pooled = [np.var(v, ddof=1) * (len(v) - 1) for v in values if len(v) >= 2]
            dof = sum(len(v) - 1 for v in values if len(v) >= 2)
            return math.sqrt(max(0.0, float(np.nansum(pooled)) / dof - own**2))

        return cls(item_se, between([g for g, _ in gains], item_se), parent_sd, cka_se,
                   between([a.delta_cka for a in arms], cka_se), kl_se, between([a.kl for a in arms], kl_se))


@dataclass(frozen=True)
class Scenario:
    """The truth of a simulated study: theta on every parent (the held arm's true gain is (1 - theta) x
    kd_gain, before the shared-parent deviation), kd's true delta CKA, the held arm's true delta CKA
    (held_cka_share x kd's: 0 when the clamp holds) and the share of kd's KL reduction it leaves (held_kl_share),
    and further arms tested by "CKA rises without performance": (name, delta CKA share of kd's, gain share of
    kd's) each."""
    theta: float
    kd_gain: float = 0.2
    kd_delta_cka: float = 0.06
    held_cka_share: float = 0.0
    held_kl_share: float = 0.0
    others: tuple[tuple[str, float, float], ...] = ()
    parent_kl: float = 0.5  # KL to the teacher of the damaged parent and of kd (the held arm's follows the share):
    kd_kl: float = 0.1      # the KL check's margin is relative to them, so they set its scale against kl_se


def simulated_arms(scenario: Scenario, noise: NoiseSizes, rng: np.random.Generator, *, n_damages: int = 3,
                   n_seeds: int = 2, n_boot: int = 200) -> dict[tuple[str, str], tuple[Arm, ...]]:
    """One simulated study's arms (module comment above). The item bootstrap is drawn parametrically: each
    artifact's replicates are its P plus item_se x N(0, 1), independent between artifacts (the items' shared
    difficulty cancels in every gain), the same replicates count B for all."""
    out = {}
    arms_spec = [("kd", KD_METHOD, 1.0, 1.0, 0.0), ("held", HELD_METHOD, 1 - scenario.theta,
                                                    scenario.held_cka_share, scenario.held_kl_share)]
    arms_spec += [(name, name, gain, cka, 1.0) for name, cka, gain in scenario.others]
    for d in range(n_damages):
        shared = rng.normal(0.0, noise.parent_sd)
        p = rng.normal(0.0, noise.item_se)
        parent = Parent(p, p + noise.item_se * rng.standard_normal(n_boot), scenario.parent_kl, noise.kl_se, None, {})
        arms = []
        for name, method, gain_share, cka_share, kl_share in arms_spec:
            true = gain_share * scenario.kd_gain + shared + rng.normal(0.0, noise.seed_sd, n_seeds)
            P = true + rng.normal(0.0, noise.item_se, n_seeds)
            cka = (cka_share * scenario.kd_delta_cka + rng.normal(0.0, noise.cka_seed_sd, n_seeds)
                   + rng.normal(0.0, noise.cka_se, n_seeds))
            kl = (scenario.kd_kl + kl_share * (scenario.parent_kl - scenario.kd_kl)
                  + rng.normal(0.0, noise.kl_seed_sd, n_seeds) + rng.normal(0.0, noise.kl_se, n_seeds))
            half = 1.959964 * noise.cka_se
            arms.append(Arm("sim", f"d{d}", name, method, "none", tuple([name] + [f"{name}+seed{s}" for s in
                                                                                   range(1, n_seeds)]),
                            P, P + noise.item_se * rng.standard_normal((n_boot, n_seeds)), cka, cka - half,
                            cka + half, kl, np.full(n_seeds, noise.kl_se), {}, parent))
        out[("sim", f"d{d}")] = tuple(arms)
    return out


@dataclass(frozen=True)
class ThetaCalibration:
    """Outcomes of the verdict over n_tables simulated studies: counts by outcome and by deciding rule (None:
    inconclusive), and the rates."""
    scenario: Scenario
    noise: NoiseSizes
    n_tables: int
    outcomes: Mapping[str, int]
    rules: Mapping[str | None, int]

    def rate(self, outcome: str) -> float:
        return self.outcomes[outcome] / self.n_tables

    def rule_rate(self, rule: str | None) -> float:
        return self.rules[rule] / self.n_tables if rule in self.rules else 0.0


def simulate_theta_verdict(scenario: Scenario, noise: NoiseSizes, n_tables: int,
                           settings: AnalysisSettings | None = None, *, n_damages: int = 3, n_seeds: int = 2,
                           n_boot: int = 200, **overrides) -> ThetaCalibration:
    """The pre-registered verdict on `n_tables` studies drawn by :func:`simulated_arms` (thresholds and seed from
    ``settings``, the schema's defaults when None; ``overrides`` replace fields). Deterministic in the seed."""
    settings = AnalysisSettings.resolve(settings, **overrides)
    rng = np.random.default_rng([settings.seed, 16])
    outcomes = {SUPPORTED: 0, REFUTED: 0, INCONCLUSIVE: 0}
    rules: dict[str | None, int] = {}
    for _ in range(n_tables):
        arms = simulated_arms(scenario, noise, rng, n_damages=n_damages, n_seeds=n_seeds, n_boot=n_boot)
        v = analyze_arms(arms, settings).verdict
        outcomes[v.outcome] += 1
        rules[v.rule] = rules.get(v.rule, 0) + 1
    return ThetaCalibration(scenario, noise, n_tables, outcomes, rules)


# ---- The study's own power: the simulation at its measured noise, intervention and design ---------------------

PLANTED_SUPPORT, PLANTED_REFUTE = 0.9, 0.0  # theta planted for "supported" (most of kd's recovery lost) / "refuted"
POWER_TARGET = 0.8
BUDGET_SEEDS = (2, 3, 5, 8, 12)
BUDGET_ITEMS = (1, 4)  # x the study's benchmark items: the item-level standard error falls as 1 / sqrt(factor)


def measured_scenario(arms: Arms, theta: float) -> Scenario:
    """A Scenario with the intervention as the study measured it (means over the damaged parents that have a kd
    and a held arm): kd's gain, delta CKA and KL, the parent's KL, the held arm's delta CKA as a share of kd's
    and the share of kd's KL reduction it left; theta planted."""
    pairs = held_kd_pairs(arms)
    if not pairs:
        raise ValueError("measured_scenario: no damaged parent with an alignment-held and a kd arm")
    kd_gain = float(np.mean([k.gains()[0].mean() for _, k in pairs]))
    kd_cka = float(np.mean([k.delta_cka.mean() for _, k in pairs]))
    held_cka = float(np.mean([h.delta_cka.mean() for h, _ in pairs]))
    parent_kl = float(np.mean([k.parent.kl for _, k in pairs]))
    kd_kl = float(np.mean([k.kl.mean() for _, k in pairs]))
    held_kl = float(np.mean([h.kl.mean() for h, _ in pairs]))
    return Scenario(theta, kd_gain=kd_gain, kd_delta_cka=kd_cka,
                    held_cka_share=held_cka / kd_cka if kd_cka != 0 else 0.0,
                    held_kl_share=(held_kl - kd_kl) / (parent_kl - kd_kl) if parent_kl != kd_kl else 0.0,
                    parent_kl=parent_kl, kd_kl=kd_kl)


def study_power(table: pd.DataFrame, settings: AnalysisSettings, n_tables: int = 200) -> dict:
    """The study's own simulated power: the noise measured on the table (NoiseSizes.from_table; parent_sd 0, as it
    cannot be told apart from real differences between damages), the intervention as measured
    (measured_scenario), at the study's design (its damaged parents with theta, its fewest seeds) and at larger
    budgets (BUDGET_SEEDS x damages x1, x2 x BUDGET_ITEMS), each cell n_tables simulated studies (half that in
    the grid).

    Returns noise, scenario (with theta planted at PLANTED_SUPPORT), design {n_damages, n_seeds}, at_design
    {support_power (supported at PLANTED_SUPPORT), refute_power (refuted at PLANTED_REFUTE), false_support
    (supported at PLANTED_REFUTE), false_refute (refuted at PLANTED_SUPPORT)}, grid (rows with n_damages, n_seeds,
    items_factor, support_power, refute_power), intervention_blockers (why, as measured, the held arm would fail
    its manipulation check at any budget; empty when it would not), budget (the smallest grid row, by damages x seeds x items, with
    both powers >= POWER_TARGET; None when no row reaches it), n_tables, and what the simulation leaves out.
    ValueError when no arm has two seeds (no seed variance to measure) or no parent has both arms."""
    arms = arms_by_parent(table)
    noise = NoiseSizes.from_table(table)
    support = measured_scenario(arms, PLANTED_SUPPORT)
    refute = dataclasses.replace(support, theta=PLANTED_REFUTE)
    seeds = [min(h.n_seeds, k.n_seeds) for h, k in held_kd_pairs(arms)]
    design = {"n_damages": len(seeds), "n_seeds": min(seeds)}

    def rates(n_damages: int, n_seeds: int, items: int, n: int) -> tuple[ThetaCalibration, ThetaCalibration]:
        scaled = dataclasses.replace(noise, item_se=noise.item_se / math.sqrt(items))
        return tuple(simulate_theta_verdict(s, scaled, n, settings, n_damages=n_damages, n_seeds=n_seeds)
                     for s in (support, refute))

    planted, null = rates(design["n_damages"], design["n_seeds"], 1, n_tables)
    grid = []
    for damages in (design["n_damages"], 2 * design["n_damages"]):
        for items in BUDGET_ITEMS:
            for n_seeds in BUDGET_SEEDS:
                s, r = rates(damages, n_seeds, items, max(n_tables // 2, 1))
                grid.append({"n_damages": damages, "n_seeds": n_seeds, "items_factor": items,
                             "support_power": s.rate(SUPPORTED), "refute_power": r.rate(REFUTED)})
    reaching = [g for g in grid if min(g["support_power"], g["refute_power"]) >= POWER_TARGET]
    budget = min(reaching, key=lambda g: (g["n_damages"] * g["n_seeds"] * g["items_factor"], g["n_seeds"]),
                 default=None)
    # Where the intervention as measured fails its manipulation check in expectation, no budget decides: on any
    # one damaged parent (the pooled verdict needs every parent's check), not only on their mean, which a damage
    # where the clamp over-holds can hide.
    blockers = []
    for held, kd in held_kd_pairs(arms):
        one = measured_scenario({(held.model, held.degradation): (held, kd)}, PLANTED_SUPPORT)
        where = f"on {held.model}/{held.degradation}"
        if one.held_kl_share > settings.kl_margin:
            blockers.append(f"{where} the held arm left {one.held_kl_share:.2f} of kd's KL reduction, more than "
                            f"kl_margin {settings.kl_margin:g}: the KL part of the manipulation check fails whatever "
                            "the budget")
        if one.held_cka_share > settings.held_cka_margin:
            blockers.append(f"{where} the held arm kept {one.held_cka_share:.2f} of kd's delta CKA, more than "
                            f"held_cka_margin {settings.held_cka_margin:g}: the delta CKA part fails whatever the "
                            "budget")
    return {"noise": dataclasses.asdict(noise), "scenario": dataclasses.asdict(support), "design": design,
            "intervention_blockers": blockers,
            "planted_support": PLANTED_SUPPORT, "planted_refute": PLANTED_REFUTE, "target": POWER_TARGET,
            "at_design": {"support_power": planted.rate(SUPPORTED), "refute_power": null.rate(REFUTED),
                          "false_support": null.rate(SUPPORTED), "false_refute": planted.rate(REFUTED)},
            "grid": grid, "budget": budget, "n_tables": n_tables,
            "leaves_out": "the RBF CKA, Procrustes and k-NN parts of the manipulation check (not simulated), any "
                          "between-damage variation of theta (parent_sd 0), and differences between the damages' "
                          "interventions (every simulated damage has the mean of the measured ones; the blockers "
                          "read each damage)"}
