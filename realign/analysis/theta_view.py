"""The report's view of the pre-registered test: the statistics' `theta` entry
(realign.analysis.theta_summary.theta_entry) turned into what report/report.html.j2 shows, the per-damage verdict
table first.

The rules are stated from the thresholds the entry carries (the settings the analysis ran with), in the words of
realign.analysis.theta.rules' docstring, so that the report states them before any result; numbers stay numbers
here and are formatted by the template's `num` filter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from realign.analysis.theta.power import JobCosts, cheapest_deciding
from realign.analysis.theta_summary import HOW_TO_ESTIMATE

TITLE = "Pre-registered test: θ = 1 − gain(held) / gain(kd), per damage"


@dataclass(frozen=True)
class VerdictRow:
    """One damage: its outcome and reasons, H1 / H1' / H2, and theta where it was estimated."""
    damage: str
    family: str
    outcome: str
    reasons: tuple[str, ...]
    h1: str
    h1prime: str
    h2: str
    theta: float | None = None
    low: float | None = None
    high: float | None = None
    bounded: bool = False
    gain_held: float | None = None
    gain_kd: float | None = None
    seeds: int = 0


@dataclass(frozen=True)
class PartRow:
    name: str
    status: str
    required: bool
    value: float | None
    upper: float | None
    statement: str


@dataclass(frozen=True)
class CheckRow:
    damage: str
    held: str
    allowed_fraction: float
    passed: bool
    h2: str
    parts: tuple[PartRow, ...]


@dataclass(frozen=True)
class ThetaView:
    """`present`: the statistics carry a theta entry; `rules`, `check_rules`: stated with their thresholds."""
    title: str
    present: bool
    estimated: bool
    rules: tuple[str, ...] = ()
    check_rules: tuple[str, ...] = ()
    outcome: str = ""
    reason: str = ""
    lines: tuple[str, ...] = ()
    rows: tuple[VerdictRow, ...] = ()
    summary: dict[str, Any] | None = None
    level: float | None = None
    checks: tuple[CheckRow, ...] = ()
    not_estimated: str = ""
    how_to_estimate: str = ""
    notes: tuple[str, ...] = field(default=())
    power: dict[str, Any] | None = None
    budget_here: BudgetHere | None = None


@dataclass(frozen=True)
class BudgetHere:
    """The cheapest deciding design of the power grid priced at this study's own mean job times (the statistics
    price it at JobCosts' defaults, so that the same table gives the same statistics): the design, its job time for
    the runs, and the per-run costs used (JobCosts' fields, seconds)."""
    n_seeds: int
    items: float
    probes: float
    job_hours: float
    costs: dict[str, float]


def rule_statements(t: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The verdict's rules and the manipulation check's parts, with the thresholds `t` (theta_entry's)."""
    alpha, level = t["alpha"], 1 - t["alpha"]
    rules = (
        f"Eligibility, judged on kd and the damaged parent only, before any θ: the damage is beyond noise; kd's gain "
        f"and ΔCKA have {level:.0%} lower bounds above 0; kd's mean gain is at least eligible_gain_share = "
        f"{t['eligible_gain_share']:g} of the damage; on a quantized or pruned parent, kd's record shows it changed "
        "the damaged weights. An ineligible damage is reported with its reasons and left out.",
        f"H1 refuted (“performance recovers while CKA stays low”) on a damage when θ's upper bound is below θ_refute "
        f"= {t['theta_refute']:g} (Holm across eligible damages, α / 2 = {alpha / 2:g}) and the check's CKA and KL "
        "parts passed; supported when θ's lower bound is above θ_support = "
        f"{t['theta_support']:g} (same Holm and level) and the check passed.",
        f"H1′ refuted (“CKA rises without performance”) when alignment-only raises ΔCKA beyond cka_rise_min = "
        f"{t['cka_rise_min']:g} of kd's while its gain stays below meaningful_recovery = "
        f"{t['meaningful_recovery']:g} of kd's (paired by seed, Holm across damages, α / 2).",
        "Per damage: refuted, check failed, supported or inconclusive, in that order. Overall: refuted when H1 or H1′ "
        "is refuted on some eligible damage and H1 supported on none; mixed when refuted on some and supported on "
        "others; supported only when H1 is supported on every eligible damage with at least two families eligible; "
        "otherwise inconclusive. θ's interval: seeds paired across arms, one seed covariance pooled across the "
        "eligible damages, Fieller. With one seed per arm the seeds' variance is unmeasured, and neither H1 nor H1′ "
        "decides.",
    )
    checks = (
        f"ΔCKA (required): the upper {level:.0%} bound of mean ΔCKA(held) − (dose + held_cka_margin = "
        f"{t['held_cka_margin']:g}) × mean ΔCKA(kd) is at most 0, held, kd and parent on the same probe resamples.",
        f"Output KL to the teacher (required): the held arm leaves at most kl_margin = {t['kl_margin']:g} of kd's KL "
        f"reduction (upper {level:.0%} bound, on the same resampled divergence prompts).",
        "RBF CKA, Procrustes, mutual k-NN (H2, never blocking H1): the same margin relative to kd's rise; a measure "
        "the clamp does not hold makes H2 “not tested by this intervention”.",
    )
    return rules, checks


def _row(v: dict[str, Any], theta: dict[str, Any] | None) -> VerdictRow:
    extra = {}
    if theta is not None:
        extra = {"theta": theta["theta"], "low": theta["low"], "high": theta["high"], "bounded": theta["bounded"],
                 "gain_held": theta["gain_held"], "gain_kd": theta["gain_kd"], "seeds": len(theta["seeds"])}
    return VerdictRow(v["damage"], v["family"], v["outcome"], tuple(v["reasons"]), v["h1"], v["h1prime"], v["h2"],
                      **extra)


def budget_here(power: dict[str, Any] | None, job_means: dict[str, float | None] | None) -> BudgetHere | None:
    """The power grid's cheapest deciding design at this study's own mean seconds per job, by rule (the report's
    run times); None without a grid, without job times, or where no design decides."""
    if not power or not power.get("grid") or not job_means:
        return None
    costs = JobCosts.from_job_means(job_means)
    best = cheapest_deciding(power["grid"], len(power["damages"]), costs, bool(power.get("require_check")))
    if best is None:
        return None
    return BudgetHere(best["n_seeds"], best["items"], best["probes"], best["job_seconds"] / 3600,
                      dataclasses.asdict(costs))


def theta_view(entry: dict[str, Any] | None, job_means: dict[str, float | None] | None = None) -> ThetaView:
    """The view of the statistics' `theta` entry (None: statistics without one); job_means: this study's mean
    seconds per job, by rule, to price the power grid at (budget_here)."""
    if not entry:
        return ThetaView(TITLE, False, False, not_estimated="these statistics carry no theta entry (they were not "
                         "computed by realign.analysis.stats.analyze_with_controls)",
                         how_to_estimate=HOW_TO_ESTIMATE)
    rules, check_rules = rule_statements(entry["thresholds"])
    notes = tuple(entry.get("notes") or ())
    if not entry["estimated"]:
        return ThetaView(TITLE, True, False, rules, check_rules, not_estimated=entry["reason"],
                         how_to_estimate=entry["how_to_estimate"], notes=notes)
    thetas = {d["damage"]: d for d in entry["damages"]}
    rows = tuple(_row(v, thetas.get(v["damage"])) for v in entry["verdicts"])
    checks = tuple(CheckRow(c["damage"], c["held"], c["allowed_fraction"], c["passed"], c["h2"],
                            tuple(PartRow(p["name"], p["status"], p["required"], p["value"], p["upper"],
                                          p["statement"]) for p in c["parts"]))
                   for c in entry["checks"])
    return ThetaView(TITLE, True, True, rules, check_rules, entry["outcome"], entry["reason"], tuple(entry["lines"]),
                     rows, entry["summary"], 1 - entry["thresholds"]["alpha"], checks, notes=notes,
                     power=entry.get("power"), budget_here=budget_here(entry.get("power"), job_means))
