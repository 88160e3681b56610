"""The pre-registered test (realign.analysis.theta) as plain JSON data, for the statistics file and the report:
:func:`theta_entry` decides whether the table can estimate theta at all and, when it can, runs
:func:`realign.analysis.theta.analyze_arms` and copies its result.

Nothing here computes a statistic or applies a rule: every number and every outcome is the ThetaAnalysis's,
copied. The thresholds are copied from the settings into the entry, estimated or not, so that the report can state
the rules before any result (and a reader can check that the rules were those configured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from realign.analysis.arms import HELD_METHOD, KD_METHOD, arms_by_parent
from realign.analysis.components import MIN_SEEDS
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta import ThetaAnalysis, analyze_arms
from realign.analysis.theta.power import study_power
from realign.io import jsonable

# The columns arms_by_parent reads unconditionally; the others are optional there and their absence is reported by
# the eligibility or the check, not here.
REQUIRED_COLUMNS = ("model", "degradation", "recovery", "recovery_method", "P", "P_boot")

HOW_TO_ESTIMATE = (f"theta needs, on each damaged parent, an `{HELD_METHOD}` arm beside a `{KD_METHOD}` arm from the "
                   f"undamaged teacher, each with at least {MIN_SEEDS} training seeds (a study block's `seeds:`), "
                   "paired by seed")


def thresholds(settings: AnalysisSettings) -> dict[str, float]:
    """The settings the rules read, and the fixed minimum of seeds per arm."""
    return {"alpha": settings.alpha, "theta_support": settings.theta_support, "theta_refute": settings.theta_refute,
            "meaningful_recovery": settings.meaningful_recovery, "cka_rise_min": settings.cka_rise_min,
            "held_cka_margin": settings.held_cka_margin, "kl_margin": settings.kl_margin,
            "eligible_gain_share": settings.eligible_gain_share, "min_seeds": MIN_SEEDS}


def theta_summary(analysis: ThetaAnalysis) -> dict[str, Any]:
    """The verdict (overall and per damage), eligibility, theta per damage and its summary, the per-arm checks and
    H1' as JSON data (NaN and +-inf as None)."""
    v = analysis.verdict
    summary = analysis.theta.summary
    return jsonable({
        "outcome": v.outcome, "reason": v.reason, "lines": list(v.lines),
        "verdicts": [dataclasses.asdict(d) for d in v.damages],
        "eligibility": [dataclasses.asdict(e) for e in analysis.eligibility],
        "damages": [{**dataclasses.asdict(d), "var": d.var} for d in analysis.theta.damages],
        "summary": None if summary is None else {
            **{f.name: getattr(summary, f.name) for f in dataclasses.fields(summary) if f.name != "random_effects"},
            "random_effects": None if summary.random_effects is None else dataclasses.asdict(summary.random_effects)},
        "seed_df": analysis.theta.seed.df,
        "checks": [{"damage": c.damage, "held": c.held, "kd": c.kd, "allowed_fraction": c.allowed_fraction,
                    "passed": c.passed, "h2": c.h2, "parts": [dataclasses.asdict(p) for p in c.parts]}
                   for c in analysis.checks],
        "only": [{**dataclasses.asdict(o), "recovery_ratio": o.recovery_ratio} for o in analysis.only],
    })


def _not_estimated(reason: str, settings: AnalysisSettings, notes: list[str] | None = None) -> dict[str, Any]:
    return jsonable({"estimated": False, "reason": reason, "how_to_estimate": HOW_TO_ESTIMATE,
                     "thresholds": thresholds(settings), "notes": notes or []})


def theta_entry(table: pd.DataFrame, settings: AnalysisSettings) -> dict[str, Any]:
    """The `theta` entry of the statistics: {"estimated": True, "thresholds", "notes", "power", **theta_summary}
    when some damaged parent has a kd arm from the undamaged teacher and an alignment-held arm; else
    {"estimated": False, "reason", "how_to_estimate", "thresholds", "notes"}. A table the analysis refuses
    (ValueError) gives the latter with that reason, so that the report still renders."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        return _not_estimated(f"the table lacks column(s) {', '.join(missing)}", settings)
    damaged_held = (table["recovery_method"] == HELD_METHOD) & (table["degradation"] != "none")
    if not damaged_held.any():
        return _not_estimated(f"no {HELD_METHOD} arm in the study", settings)
    try:
        arms = arms_by_parent(table)
    except ValueError as err:
        return _not_estimated(f"the arms cannot be read from the table: {err}", settings)
    with_held = [p for p, on_parent in arms.items() if any(a.method == HELD_METHOD for a in on_parent)]
    orphans = [f"{m}/{d}" for (m, d) in with_held
               if not any(a.method == KD_METHOD and a.teacher == "none" for a in arms[(m, d)])]
    notes = [f"no {KD_METHOD} arm (from the undamaged teacher) on parent {p}: its {HELD_METHOD} arm is not tested"
             for p in orphans]
    if not with_held:
        return _not_estimated(f"no final run of an {HELD_METHOD} arm on a damaged parent", settings)
    if len(orphans) == len(with_held):
        return _not_estimated("; ".join(notes), settings)
    try:
        analysis = analyze_arms(arms, settings)
    except ValueError as err:
        return _not_estimated(f"the theta analysis refused the table: {err}", settings, notes)
    return {"estimated": True, "thresholds": jsonable(thresholds(settings)), "notes": notes,
            **theta_summary(analysis), "power": _power(arms, settings)}


def _power(arms, settings: AnalysisSettings) -> dict[str, Any]:
    """The study's own simulated power and sizing (realign.analysis.theta.power.study_power), or {"error": why}."""
    if not settings.power_tables:
        return {"error": "analysis.power_tables is 0"}
    try:
        return jsonable(study_power(arms, settings, n_tables=settings.power_tables))
    except ValueError as err:
        return {"error": str(err)}
