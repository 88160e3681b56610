"""The pre-registered theta analysis (realign.analysis.preregistered) as plain JSON data, for the statistics file
and the report: :func:`theta_entry` decides whether the table can estimate theta at all and, when it can, runs
:func:`realign.analysis.preregistered.analyze_arms` and presents its result with :func:`theta_summary`.

Nothing here computes a statistic or applies a rule: every number and every fired / not fired is the
ThetaAnalysis's, copied. The thresholds are copied from the settings into the entry, estimated or not, so that
the report can state the rules before any result (and a reader can check that the rules were those configured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from realign.analysis.arms import HELD_METHOD, KD_METHOD, Arms, arms_by_parent
from realign.analysis.components import MIN_SEEDS
from realign.analysis.estimand import ThetaDamage, ThetaPooled
from realign.analysis.manipulation import ManipulationCheck
from realign.analysis.preregistered import Rule, ThetaAnalysis, analyze_arms
from realign.analysis.settings import AnalysisSettings
from realign.io import jsonable

# The columns arms_by_parent reads unconditionally; the others (delta CKA, KL, similarity) are optional there and
# their absence is reported by the manipulation check, not here.
REQUIRED_COLUMNS = ("model", "degradation", "recovery", "recovery_method", "P", "P_boot")

HOW_TO_ESTIMATE = (f"theta needs, on each damaged parent, an `{HELD_METHOD}` arm beside a `{KD_METHOD}` arm from the "
                   f"undamaged teacher, each with at least {MIN_SEEDS} training seeds (a study block's `seeds:`); "
                   "configs/controls.yaml has the held arm on two damages")


def thresholds(settings: AnalysisSettings) -> dict[str, float]:
    """The settings the rules read, and the fixed minimum of seeds per arm."""
    return {"alpha": settings.alpha, "theta_support": settings.theta_support, "theta_refute": settings.theta_refute,
            "meaningful_recovery": settings.meaningful_recovery, "cka_rise_min": settings.cka_rise_min,
            "held_cka_margin": settings.held_cka_margin, "kl_margin": settings.kl_margin, "min_seeds": MIN_SEEDS}


def _rule(rule: Rule) -> dict[str, Any]:
    return {"name": rule.name, "outcome": rule.outcome, "fired": rule.fired, "reason": rule.reason,
            "numbers": dict(rule.numbers)}


def _damage(d: ThetaDamage) -> dict[str, Any]:
    # Every field but the linearised replicates (`influence`: B numbers, only for the pooled covariance).
    out = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if f.name != "influence"}
    return {"parent": d.label, **out, "seeds_ok": d.seeds_ok}


def _pooled(p: ThetaPooled | None) -> dict[str, Any] | None:
    if p is None:
        return None
    # One flat object, as before the pooling's fields had their own type: estimate, low, high, level, k, ...
    out = {**dataclasses.asdict(p.pooling), "level": p.level, "damages": list(p.damages)}
    out["excluded"] = [{"parent": label, "reason": reason} for label, reason in p.excluded]
    return out


def _check(c: ManipulationCheck) -> dict[str, Any]:
    return {"parent": c.label, "held": c.held, "kd": c.kd, "allowed_fraction": c.allowed_fraction,
            "passed": c.passed, "parts": [dataclasses.asdict(p) for p in c.parts]}


def theta_summary(analysis: ThetaAnalysis) -> dict[str, Any]:
    """The verdict (outcome, deciding rule, reason, its numbers), every rule, theta per damaged parent and pooled,
    the manipulation checks and the per-arm evidence, as JSON data (NaN and +-inf as None)."""
    v = analysis.verdict
    return jsonable({
        "outcome": v.outcome, "rule": v.rule, "reason": v.reason, "numbers": dict(v.numbers),
        "rules": [_rule(r) for r in v.rules],
        "damages": [_damage(d) for d in analysis.theta.damages],
        "pooled": _pooled(analysis.theta.pooled),
        "checks": [_check(c) for c in analysis.checks],
        "arms": [dataclasses.asdict(a) for a in analysis.arms],
    })


def _not_estimated(reason: str, settings: AnalysisSettings, notes: list[str] | None = None) -> dict[str, Any]:
    return jsonable({"estimated": False, "reason": reason, "how_to_estimate": HOW_TO_ESTIMATE,
                     "thresholds": thresholds(settings), "notes": notes or []})


def _held_without_kd(arms: Arms) -> list[str]:
    """The damaged parents with a held arm but no kd arm from the undamaged teacher (pick()'s choice of kd)."""
    return [f"{model}/{degradation}" for (model, degradation), on_parent in arms.items()
            if any(a.method == HELD_METHOD for a in on_parent)
            and not any(a.method == KD_METHOD and a.teacher == "none" for a in on_parent)]


def theta_entry(table: pd.DataFrame, settings: AnalysisSettings) -> dict[str, Any]:
    """The `theta` entry of the statistics: {"estimated": True, "thresholds", "notes", **theta_summary} when some
    damaged parent has an alignment-held arm and a kd arm from the undamaged teacher; else {"estimated": False,
    "reason", "how_to_estimate", "thresholds", "notes"}. A table the theta analysis refuses (ValueError: e.g. two
    held arms on one parent, which the table cannot tell apart by dose) gives the latter with that reason, so
    that the report still renders; any other exception is a bug and propagates."""
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
    orphans = _held_without_kd(arms)
    notes = [f"no {KD_METHOD} arm (from the undamaged teacher) on parent {p}: its {HELD_METHOD} arm is not in theta"
             for p in orphans]
    with_held = [p for p, on_parent in arms.items() if any(a.method == HELD_METHOD for a in on_parent)]
    if not with_held:  # held rows, but only checkpoints: no final run forms an arm
        return _not_estimated(f"no final run of an {HELD_METHOD} arm on a damaged parent", settings)
    if len(orphans) == len(with_held):
        return _not_estimated("; ".join(notes), settings)
    try:
        analysis = analyze_arms(arms, settings)
    except ValueError as err:
        return _not_estimated(f"the theta analysis refused the table: {err}", settings, notes)
    summary = theta_summary(analysis)
    families = _families(table)
    for d in summary["damages"]:
        d["family"] = families.get(d["parent"], "")
    return {"estimated": True, "thresholds": jsonable(thresholds(settings)), "notes": notes, **summary,
            "power": _power(table, settings)}


def _families(table: pd.DataFrame) -> dict[str, str]:
    """model/degradation -> the damage family of its damaged-parent row ("" without a family column)."""
    if "family" not in table:
        return {}
    parents = table[(table["recovery"] == "none") & (table["degradation"] != "none")]
    return {f"{r.model}/{r.degradation}": str(r.family) for r in parents.itertuples()}


def _power(table: pd.DataFrame, settings: AnalysisSettings) -> dict[str, Any]:
    """The study's own simulated power (realign.analysis.calibration.study_power), or {"error": why not}."""
    from realign.analysis.calibration import study_power

    if not settings.power_tables:
        return {"error": "analysis.power_tables is 0"}
    try:
        return jsonable(study_power(table, settings, n_tables=settings.power_tables))
    except ValueError as err:
        return {"error": str(err)}
