"""The report's view of the pre-registered theta test: the statistics' `theta` entry
(realign.analysis.theta_summary.theta_entry) turned into what report/report.html.j2 shows.

The rules are stated from the thresholds the entry carries (the settings the analysis ran with), in the words of
realign.analysis.preregistered's docstring, so that the report states them before any result; numbers stay
numbers here and are formatted by the template's `num` filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from realign.analysis.theta_summary import HOW_TO_ESTIMATE

TITLE = "Pre-registered test: θ = 1 − gain(held) / gain(kd)"


@dataclass(frozen=True)
class DamageRow:
    parent: str
    held: str
    kd: str
    theta: float | None
    low: float | None
    high: float | None
    bounded: bool
    seeds_held: int
    seeds_kd: int
    gain_held: float | None
    gain_kd: float | None
    family: str = ""  # the damage family of the parent (forgetting, quantization, pruning)


@dataclass(frozen=True)
class PartRow:
    name: str
    status: str
    required: bool
    value: float | None
    limit: float | None
    statement: str


@dataclass(frozen=True)
class CheckRow:
    parent: str
    held: str
    allowed_fraction: float
    passed: bool
    parts: tuple[PartRow, ...]


@dataclass(frozen=True)
class RuleRow:
    name: str
    fired: bool
    reason: str


@dataclass(frozen=True)
class ThetaView:
    """`present`: the statistics carry a theta entry (statistics from `analyze` alone do not); `rules`,
    `check_rules`: the rules and the manipulation check stated with their thresholds (empty without an entry)."""
    title: str
    present: bool
    estimated: bool
    rules: tuple[str, ...] = ()
    check_rules: tuple[str, ...] = ()
    outcome: str = ""
    reason: str = ""
    rule_rows: tuple[RuleRow, ...] = ()
    damages: tuple[DamageRow, ...] = ()
    pooled: dict[str, Any] | None = None
    level: float | None = None
    checks: tuple[CheckRow, ...] = ()
    not_estimated: str = ""
    how_to_estimate: str = ""
    notes: tuple[str, ...] = field(default=())
    power: dict[str, Any] | None = None  # the study's simulated power (realign.analysis.calibration.study_power)


def rule_statements(t: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The verdict's rules and the manipulation check's parts, with the thresholds `t` (theta_entry's)."""
    alpha, level = t["alpha"], 1 - t["alpha"]
    seeds = t["min_seeds"]
    rules = (
        f"refute-clamp — refuted (“performance recovers while CKA stays low”) when the upper bound of pooled θ's "
        f"{level:.0%} interval is below θ_refute = {t['theta_refute']:g}, the manipulation check passed on every "
        f"pooled damaged parent, and every arm in θ has at least {seeds} training seeds.",
        f"refute-cka-without-recovery — refuted (“CKA rises without performance”) when some arm other than kd and "
        f"the held arm raises ΔCKA beyond cka_rise_min = {t['cka_rise_min']:g} of kd's on the same parent while "
        f"its gain stays below meaningful_recovery = {t['meaningful_recovery']:g} of kd's, Holm-adjusted p below "
        f"α / 2 = {alpha / 2:g}.",
        f"support-theta — supported when the lower bound of pooled θ's {level:.0%} interval is above θ_support = "
        f"{t['theta_support']:g}, with the same manipulation-check and seed conditions as refute-clamp.",
        "Otherwise inconclusive. The two refutations take precedence over support; every rule reads an interval or "
        "an adjusted p-value, never a point value.",
    )
    checks = (
        f"ΔCKA: every held run's upper bound at most (dose + held_cka_margin = {t['held_cka_margin']:g}) × kd's "
        "mean ΔCKA on the same parent.",
        f"Output KL to the teacher: the held arm leaves at most kl_margin = {t['kl_margin']:g} of kd's KL "
        f"reduction (upper bound of the {level:.0%} interval).",
        "RBF CKA, Procrustes, mutual k-NN: the held runs at most the damaged parent's upper bound, where the table "
        "carries one (otherwise not evaluated, and not deciding).",
    )
    return rules, checks


def theta_view(entry: dict[str, Any] | None) -> ThetaView:
    """The view of the statistics' `theta` entry (None: statistics without one)."""
    if not entry:
        return ThetaView(TITLE, False, False, not_estimated="these statistics carry no theta entry (they were not "
                         "computed by realign.analysis.stats.analyze_with_controls)",
                         how_to_estimate=HOW_TO_ESTIMATE)
    rules, check_rules = rule_statements(entry["thresholds"])
    notes = tuple(entry.get("notes") or ())
    if not entry["estimated"]:
        return ThetaView(TITLE, True, False, rules, check_rules, not_estimated=entry["reason"],
                         how_to_estimate=entry["how_to_estimate"], notes=notes)
    damages = tuple(DamageRow(d["parent"], d["held"], d["kd"], d["theta"], d["low"], d["high"], d["bounded"],
                              d["n_seeds_held"], d["n_seeds_kd"], d["gain_held"], d["gain_kd"], d.get("family", ""))
                    for d in entry["damages"])
    checks = tuple(CheckRow(c["parent"], c["held"], c["allowed_fraction"], c["passed"],
                            tuple(PartRow(p["name"], p["status"], p["required"], p["value"], p["limit"],
                                          p["statement"]) for p in c["parts"]))
                   for c in entry["checks"])
    return ThetaView(TITLE, True, True, rules, check_rules, entry["outcome"], entry["reason"],
                     tuple(RuleRow(r["name"], r["fired"], r["reason"]) for r in entry["rules"]), damages,
                     entry["pooled"], 1 - entry["thresholds"]["alpha"], checks, notes=notes,
                     power=entry.get("power"))

