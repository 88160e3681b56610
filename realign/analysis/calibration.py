"""Calibration of the descriptive association verdict (realign.analysis.association) by simulation: its rate of
"supported" on synthetic tables with a planted effect (power) and with none (false positives):
:func:`simulate_calibration`. The pre-registered test's power and sizing live with it, in
realign.analysis.theta.power."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

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
        counts[out["association"]] += 1
    rate = {k: v / n_sims for k, v in counts.items()}
    return {"n_artifacts": n_artifacts, "effect": effect, "n_sims": n_sims, "alpha": settings.alpha,
            "min_effect": settings.min_effect, "true_spearman": true_rho, "counts": counts,
            "supported_rate": rate["supported"], "refuted_rate": rate["refuted"],
            "inconclusive_rate": rate["inconclusive"],
            "supported_rate_se": math.sqrt(rate["supported"] * (1 - rate["supported"]) / n_sims)}
