"""Power of the pre-registered test at the noise a study measured, and the design that would decide (issue 28).

The simulation draws, per damage, what the real study has, measured on its own table
(:func:`measured_noise`):

* **item noise shared by every run** of the damage: one draw of the 2 x 2 item covariance of the (held, kd) gain
  means, with the measured held-kd item correlation (the distinct-seed covariance of the joint bootstrap,
  realign.analysis.theta.paired), divided by the items factor;
* **seed noise, paired**: each seed draws (held, kd) together from the pooled seed covariance as measured (on
  the theta scale, times the damage's own kd gain squared; not floored);
* **probe noise shared by the runs** (one probe set): the measured 2 x 2 probe covariance of the (held, kd) delta
  CKA means divided by the probe factor (probe sequences x factor; positions per sequence enter through the
  measured per-sequence variance only); seed noise of delta CKA likewise;
* **KL**: the measured 3 x 3 prompt covariance of (held, kd, parent) and its seed covariance;
* **each damage its own** kd gain, kd delta CKA, held delta CKA share and KL as measured; theta planted.

Each simulated damage is turned into the same paired quantities a table gives (parametric replicates: one shared
draw per replicate for every seed, so their distinct-seed covariance is the item covariance) and run through the
same estimator and check (realign.analysis.theta.estimator.estimate_paired, check.required_parts).

:func:`study_power` reports the power at the study's design and over a grid of (seeds, items, probe sequences),
the validation (at each damage's theta as measured, the simulated median theta half-width against the observed
one, per damage: within 25 %), and the
cheapest design (job time under JobCosts; :func:`cheapest_deciding`) with power >= POWER_TARGET both to refute at
theta = 0 and to support at theta = 0.9 on every damage; H1' power (an alignment-only arm that re-aligns as much as
kd and recovers nothing) at that design.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence
import numpy as np

from realign.analysis.arms import Arms
from realign.analysis.components import t_quantile
from realign.analysis.theta.check import PASSED, required_parts
from realign.analysis.theta.damage import damages_of_arms
from realign.analysis.theta.estimator import estimate_paired
from realign.analysis.theta.h1prime import one_sided_tests
from realign.analysis.theta.paired import Paired, pool_seed_covariance

PLANTED_SUPPORT, PLANTED_REFUTE = 0.9, 0.0
POWER_TARGET = 0.8
VALIDATION_TOLERANCE = 0.25
GRID_SEEDS = (2, 3, 4, 6, 8)
GRID_ITEMS = (1, 2, 4, 8)    # x the study's items
GRID_PROBES = (1, 2, 4, 8, 16)   # x the study's probe sequences
SIM_REPLICATES = 200
# Seconds of job time per run on the project's 2-core machine, from the default study's uncontended jobs at e845fe7
# (docs/2026-12-06-statistics-reanalysis.md): training (kd / held / alignment-only, mean), divergence, and the parts
# that grow with the items (evaluation) and with the probe sequences (activations; similarity). The grid's cost.
SECONDS_TRAIN, SECONDS_DIVERGENCE, SECONDS_PER_ITEMS = 110.0, 25.0, 90.0
SECONDS_ACTIVATIONS, SECONDS_SIMILARITY = 15.0, 20.0
ARMS_PER_DAMAGE = 3  # kd, alignment-held, alignment-only
# The Snakemake rule whose mean job time is each JobCosts field (JobCosts.from_job_means).
COST_RULES = {"recover": "train", "divergence": "divergence", "evaluate": "per_items", "activations": "activations",
              "similarity": "similarity"}


@dataclass(frozen=True)
class JobCosts:
    """Seconds of job time per run at the study's own design: training (mean over the arms), divergence, evaluation
    of its items, activations and similarity of its probe. The defaults are the default study's (above); a pilot
    passes the per-job times it measured.

    Evaluation and activations scale with their factor. Similarity scales with the probe factor's square: RBF CKA,
    Procrustes and mutual k-NN work on n x n matrices of the probe's n positions, each recomputed per jackknife
    group. Measured: 96 -> 384 sequences (x 4) took the similarity job from 15.8 s to about 300 s (x 19; the
    confirmatory study, docs/2026-12-07-preregistration.md), and activations from 27.5 s to about 88 s (x 3.2). A
    linear model had priced that study's probe at a quarter of its cost."""
    train: float = SECONDS_TRAIN
    divergence: float = SECONDS_DIVERGENCE
    per_items: float = SECONDS_PER_ITEMS
    activations: float = SECONDS_ACTIVATIONS
    similarity: float = SECONDS_SIMILARITY

    def per_run(self, items: float, probes: float) -> float:
        return (self.train + self.divergence + self.per_items * items + self.activations * probes
                + self.similarity * probes ** 2)

    @classmethod
    def from_job_means(cls, means: Mapping[str, float | None]) -> JobCosts:
        """The costs at a study's own mean seconds per job, by rule (COST_RULES: recover, divergence, evaluate,
        activations, similarity); a rule with no finite, positive mean keeps its default."""
        measured = {field: float(means[rule]) for rule, field in COST_RULES.items()
                    if means.get(rule) is not None and math.isfinite(means[rule]) and means[rule] > 0}
        return cls(**measured)


@dataclass(frozen=True)
class Grid:
    """The designs the sizing simulates: seeds per arm, and items and probe sequences as multiples of the
    study's own."""
    seeds: tuple[int, ...] = GRID_SEEDS
    items: tuple[float, ...] = GRID_ITEMS
    probes: tuple[float, ...] = GRID_PROBES

    def cells(self):
        return itertools.product(self.seeds, self.items, self.probes)


def job_seconds(n_damages: int, n_seeds: int, items: float, probes: float, costs: JobCosts = JobCosts()) -> float:
    """The design's job time (the runs only; the teacher and the damaged parents are a fixed few minutes)."""
    return n_damages * ARMS_PER_DAMAGE * n_seeds * costs.per_run(items, probes)


def decides(row: dict, require_check: bool = False) -> bool:
    """A grid row (study_power's `grid`) whose powers to refute and to support reach POWER_TARGET on every damage
    (require_check: the check's pass rate too)."""
    powers = row["refute_power"] + row["support_power"] + (row["check_power"] if require_check else [])
    return min(powers) >= POWER_TARGET


def cheapest_deciding(rows: Sequence[dict], n_damages: int, costs: JobCosts, require_check: bool = False
                      ) -> dict | None:
    """The deciding grid row with the least job time under `costs` (fewer seeds on a tie), re-priced: its
    `job_seconds` are those costs'. None when no row decides. The same powers priced at another study's job times
    can name another design: the report prices a study's grid at that study's own job times."""
    priced = [{**r, "job_seconds": job_seconds(n_damages, r["n_seeds"], r["items"], r["probes"], costs)}
              for r in rows if decides(r, require_check)]
    return min(priced, key=lambda r: (r["job_seconds"], r["n_seeds"]), default=None)


@dataclass(frozen=True)
class DamageNoise:
    """What one damage measured: means and shared covariances (gain: held, kd; delta CKA: held, kd; KL: held, kd,
    parent), and the study's pooled seed covariances (theta scale; kd's delta CKA; kd's KL reduction)."""
    damage: str
    gain: np.ndarray
    gain_item: np.ndarray
    cka: np.ndarray
    cka_probe: np.ndarray
    kl: np.ndarray
    kl_prompt: np.ndarray
    dose: float
    observed_halfwidth: float


@dataclass(frozen=True)
class StudyNoise:
    damages: tuple[DamageNoise, ...]
    gain_seed: np.ndarray
    cka_seed: np.ndarray
    kl_seed: np.ndarray
    n_seeds: int


def _halfwidth(var_item: float, var_seed: float, df: float, alpha: float) -> float:
    z = t_quantile(1 - alpha / 2, math.inf)
    t = t_quantile(1 - alpha / 2, df) if var_seed > 0 and math.isfinite(df) else 0.0
    return math.sqrt(z * z * var_item + t * t * var_seed)


def measured_noise(arms: Arms, settings, only: Sequence[str] | None = None) -> StudyNoise:
    """The noise of the damages with a held arm and a positive kd gain (`only`: of these labels; ValueError when
    none has two seeds)."""
    damages = [d for d in damages_of_arms(arms) if d.held is not None and float(np.mean(d.kd.gains()[0])) > 0
               and (only is None or d.label in only)]
    roles = ("held", "kd")
    gains = [d.gains(roles) for d in damages]
    if not damages or max(g.n_seeds for g in gains) < 2:
        raise ValueError("measured_noise: no damage with a held and a kd arm of two paired seeds or more")
    ckas = [d.delta_cka(roles) for d in damages]
    kls = [d.kl(roles, settings.n_boot, settings.seed) for d in damages]
    theta = estimate_paired([(d.label, d.family, "held", "kd", ()) for d in damages], gains, settings)
    rows = []
    for d, g, c, k, t in zip(damages, gains, ckas, kls, theta.damages):
        f = d.held.hold_fraction if math.isfinite(d.held.hold_fraction) else 0.0
        rows.append(DamageNoise(d.label, g.means, g.shared_covariance(), c.means, c.shared_covariance(), k.means,
                                k.shared_covariance(), f, _halfwidth(t.var_item, t.var_seed, t.df, settings.alpha)))
    return StudyNoise(tuple(rows), pool_seed_covariance(gains).cov, pool_seed_covariance(ckas).cov,
                      pool_seed_covariance(kls).cov, min(g.n_seeds for g in gains))


def _psd(m: np.ndarray) -> np.ndarray:
    """The nearest positive-semidefinite matrix (eigenvalues clipped at 0): a covariance estimated from distinct
    seeds' replicates, or from two seeds, can dip below it by sampling noise."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.clip(w, 0.0, None)) @ v.T


def _draw(names: tuple[str, ...], true: np.ndarray, shared: np.ndarray, seed_cov: np.ndarray, scale: float,
          n_seeds: int, rng: np.random.Generator) -> Paired:
    a = len(true)
    shared, seed_cov = _psd(shared), _psd(seed_cov)
    common = rng.multivariate_normal(np.zeros(a), shared, method="eigh")
    own = rng.multivariate_normal(np.zeros(a), seed_cov * scale**2, size=n_seeds, method="eigh")
    values = true + common + own
    eta = rng.multivariate_normal(np.zeros(a), shared, size=SIM_REPLICATES, method="eigh")
    replicates = values[None, :, :] + eta[:, None, :]
    kd = values[:, 1].mean()
    return Paired(names, tuple(range(n_seeds)), values, replicates, abs(kd) if kd else 1.0)


def _simulate(noise: StudyNoise, theta: float | None, n_seeds: int, items: float, probes: float, n_sims: int, settings,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per damage: the rate of H1 refuted / supported (check passed), the rate at which the check's CKA and KL
    parts both pass (held at its measured delta CKA and KL, whatever theta), and the theta half-widths; theta
    None: each damage's held gain as measured (the validation's truth)."""
    k = len(noise.damages)
    refuted, supported, checked = np.zeros(k), np.zeros(k), np.zeros(k)
    halfwidths = [[] for _ in range(k)]
    for _ in range(n_sims):
        gains, ckas, kls = [], [], []
        for d in noise.damages:
            g_kd = d.gain[1]
            true_gain = np.array([d.gain[0] if theta is None else (1 - theta) * g_kd, g_kd])
            gains.append(_draw(("held", "kd"), true_gain, d.gain_item / items, noise.gain_seed, g_kd, n_seeds, rng))
            ckas.append(_draw(("held", "kd"), d.cka, d.cka_probe / probes, noise.cka_seed, d.cka[1], n_seeds, rng))
            kls.append(_draw(("held", "kd", "parent"), d.kl, d.kl_prompt, noise.kl_seed, d.kl[2] - d.kl[1],
                             n_seeds, rng))
        est = estimate_paired([(d.damage, "", "held", "kd", ()) for d in noise.damages], gains, settings)
        parts = required_parts(ckas, kls, [d.dose for d in noise.damages], settings)
        level = settings.alpha / 2
        for i, (t, (c, kl)) in enumerate(zip(est.damages, parts)):
            ok = c.status == PASSED and kl.status == PASSED
            checked[i] += ok
            # as the rules (realign.analysis.theta.rules): only an interval with the seeds' variance decides
            refuted[i] += ok and t.seed_variance_measured and t.p_refute_holm < level
            supported[i] += ok and t.seed_variance_measured and t.p_support_holm < level
            halfwidths[i].append(_halfwidth(t.var_item, t.var_seed, t.df, settings.alpha))
    return {"refute": refuted / n_sims, "support": supported / n_sims, "check": checked / n_sims,
            "halfwidth": np.array([np.median(h) for h in halfwidths])}


def _h1prime_power(noise: StudyNoise, n_seeds: int, items: float, probes: float, n_sims: int, settings,
                   rng: np.random.Generator) -> float:
    """Power of H1' on one damage (the first) when alignment-only re-aligns as much as kd and recovers nothing:
    its seed and item noise taken as kd's (the study measured no alignment-only arm)."""
    d = noise.damages[0]
    hits = 0
    for _ in range(n_sims):
        g = _draw(("only", "kd"), np.array([0.0, d.gain[1]]), d.gain_item / items, noise.gain_seed, d.gain[1],
                  n_seeds, rng)
        c = _draw(("only", "kd"), np.array([d.cka[1], d.cka[1]]), d.cka_probe / probes, noise.cka_seed, d.cka[1],
                  n_seeds, rng)
        rise, short = one_sided_tests(c, g, pool_seed_covariance([c]), pool_seed_covariance([g]), settings)
        hits += max(rise, short) < settings.alpha / 2
    return hits / n_sims


def study_power(arms: Arms, settings, n_tables: int = 200, *, grid: bool | Grid = True,
                only: Sequence[str] | None = None, per_cell: int | None = None, costs: JobCosts = JobCosts(),
                require_check: bool = False) -> dict:
    """Power at the study's design, the validation, and (grid: True for the default Grid, or a Grid) the grid and
    the cheapest deciding design (module docstring): per_cell simulated studies per cell (default a quarter of
    n_tables), job times from `costs`; require_check: a deciding design also has the check's parts passing with
    probability >= POWER_TARGET on every damage. ValueError as :func:`measured_noise`."""
    noise = measured_noise(arms, settings, only)
    rng = np.random.default_rng([settings.seed, 28])
    at_design = {
        "refute": _simulate(noise, PLANTED_REFUTE, noise.n_seeds, 1, 1, n_tables, settings, rng),
        "support": _simulate(noise, PLANTED_SUPPORT, noise.n_seeds, 1, 1, n_tables, settings, rng),
    }
    as_measured = _simulate(noise, None, noise.n_seeds, 1, 1, n_tables, settings, rng)
    validation = []
    for i, d in enumerate(noise.damages):
        simulated = float(as_measured["halfwidth"][i])
        ratio = simulated / d.observed_halfwidth if d.observed_halfwidth else math.nan
        validation.append({"damage": d.damage, "observed_halfwidth": d.observed_halfwidth,
                           "simulated_median_halfwidth": simulated, "ratio": ratio,
                           "within_tolerance": bool(abs(ratio - 1) <= VALIDATION_TOLERANCE)})
    out = {
        "damages": [d.damage for d in noise.damages], "design": {"n_seeds": noise.n_seeds, "items": 1, "probes": 1},
        "at_design": {"refute_power": at_design["refute"]["refute"].tolist(),
                      "check_power": at_design["refute"]["check"].tolist(),
                      "support_power": at_design["support"]["support"].tolist(),
                      "false_support": at_design["refute"]["support"].tolist(),
                      "false_refute": at_design["support"]["refute"].tolist()},
        "validation": validation, "validated": all(v["within_tolerance"] for v in validation),
        "n_tables": n_tables, "target": POWER_TARGET, "planted_refute": PLANTED_REFUTE,
        "planted_support": PLANTED_SUPPORT,
        "leaves_out": "eligibility (every simulated damage is taken as eligible), the H2 parts, between-damage "
                      "variation of theta; alignment-only's noise is taken as kd's",
    }
    if grid:
        cells = grid if isinstance(grid, Grid) else Grid()
        rows = []
        n = per_cell or max(n_tables // 4, 1)  # default: a quarter per grid cell
        for seeds, items, probes in cells.cells():
            r = _simulate(noise, PLANTED_REFUTE, seeds, items, probes, n, settings, rng)
            s = _simulate(noise, PLANTED_SUPPORT, seeds, items, probes, n, settings, rng)
            rows.append({"n_seeds": seeds, "items": items, "probes": probes,
                         "refute_power": r["refute"].tolist(), "support_power": s["support"].tolist(),
                         "check_power": ((r["check"] + s["check"]) / 2).tolist(),
                         "job_seconds": job_seconds(len(noise.damages), seeds, items, probes, costs)})
        out["grid"] = rows
        out["n_per_cell"] = n
        out["job_costs"] = dataclasses.asdict(costs)
        out["require_check"] = require_check
        best = cheapest_deciding(rows, len(noise.damages), costs, require_check)
        out["budget"] = best
        if best is not None:
            out["h1prime_power"] = _h1prime_power(noise, best["n_seeds"], best["items"], best["probes"], n,
                                                  settings, rng)
    return out
