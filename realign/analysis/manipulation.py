"""The manipulation check of the held arm: did the constraint hold re-alignment down while the outputs still
matched the teacher? Only then does theta measure what it claims (issue 16, "An intervention that holds
alignment").

Per damaged parent, the held arm (method alignment-held, allowed fraction f of kd's re-alignment: 0 holds CKA at
the damaged model's value, 1/2 allows half) against kd on the same parent; three parts:

1. **delta CKA** (required): on the held-out probe, with the evaluation estimator (the table's delta_cka: mean
   over the pre-registered layers, paired bootstrap over probe sequences), every held run's upper bound stays at
   or below (f + held_cka_margin) x max(mean delta CKA of kd, 0). Every run, not the arm's mean: the constraint
   is enforced per run, and one run that escapes it is a run whose recovery theta should not count. The
   table's delta CKA interval is its 95% percentile interval (the `cka` step's fixed level).
2. **other similarity measures** (RBF CKA, orthogonal Procrustes, mutual k-NN): every held run's value stays at
   or below the damaged parent's upper bound of that measure: the 95% delete-a-group jackknife interval over
   probe sequences that the `cka` step gives these layer means (``<measure>_mean_ci_high``;
   realign.measure.similarity). Where the table has no such column (measure.jackknife_groups 0, or a summary
   made before the intervals existed) the part is "not evaluated" (stated in the verdict's reasons) and does
   not decide.
3. **output KL to the teacher** (required): the held arm may leave at most kl_margin of kd's KL reduction,
   KL(held) - KL(kd) <= kl_margin x (KL(parent) - KL(kd)), tested on the upper bound of the 1 - alpha interval
   of KL(held) - (1 - m) KL(kd) - m KL(parent) (arm means over seeds; seed variance plus each run's kl_stderr,
   realign.analysis.components, errs wide). If the constraint cannot hold while the outputs match, this part
   fails: that is a finding, and the verdict says so instead of deciding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from realign.analysis.arms import HELD_METHOD, KD_METHOD, OTHER_SIMILARITY, Arm, Arms, arms_by_parent, pick
from realign.analysis.components import from_standard_errors
from realign.analysis.settings import AnalysisSettings

PASSED, FAILED, NOT_EVALUATED = "passed", "failed", "not evaluated"


@dataclass(frozen=True)
class CheckPart:
    """One part of the check: `value` (the bound that was compared) against `limit`; status passed, failed or
    not evaluated; `required`: a part that is not evaluated fails the check."""
    name: str
    status: str
    required: bool
    value: float
    limit: float
    statement: str


@dataclass(frozen=True)
class ManipulationCheck:
    """The check of the held arm `held` against `kd` on the damaged parent (model, degradation)."""
    model: str
    degradation: str
    held: str
    kd: str
    allowed_fraction: float
    parts: tuple[CheckPart, ...]

    @property
    def label(self) -> str:
        return f"{self.model}/{self.degradation}"

    @property
    def passed(self) -> bool:
        return all(p.status == PASSED for p in self.parts if p.required or p.status == FAILED)

    @property
    def failures(self) -> tuple[CheckPart, ...]:
        return tuple(p for p in self.parts if p.status == FAILED or (p.required and p.status != PASSED))


def _status(value: float, limit: float) -> str:
    if not (math.isfinite(value) and math.isfinite(limit)):
        return NOT_EVALUATED
    return PASSED if value <= limit else FAILED


def _cka_part(held: Arm, kd: Arm, fraction: float, margin: float) -> CheckPart:
    kd_delta = float(np.mean(kd.delta_cka))
    limit = (fraction + margin) * max(kd_delta, 0.0)
    highs = held.delta_cka_ci_high
    value = float(np.max(highs)) if np.isfinite(highs).all() else math.nan
    status = _status(value, limit)
    statement = (f"held delta CKA (debiased, probe) upper bound over its {held.n_seeds} run(s) {value:.4g} vs limit "
                 f"({fraction:g} + {margin:g}) x kd's mean delta CKA {kd_delta:.4g} = {limit:.4g}: {status}")
    if status == NOT_EVALUATED:
        statement += " (a held run has no delta CKA interval: its CKA step wrote no bootstrap replicates)"
    return CheckPart("delta_cka", status, True, value, limit, statement)


def _similarity_part(held: Arm, measure: str) -> CheckPart:
    if measure not in held.parent.similarity_high:
        return CheckPart(measure, NOT_EVALUATED, False, math.nan, math.nan,
                         f"{measure}: not evaluated -- the table carries no interval of the damaged parent's "
                         f"{measure} (no {measure}_mean_ci_high column: its cka summary has no jackknife interval, made "
                         f"with measure.jackknife_groups 0 or before the intervals existed)")
    limit = held.parent.similarity_high[measure]
    values = held.similarity[measure] if measure in held.similarity else np.full(held.n_seeds, np.nan)
    value = float(np.max(values))
    status = _status(value, limit)
    return CheckPart(measure, status, True, value, limit,
                     f"{measure}: held runs' highest value {value:.4g} vs the damaged parent's upper bound "
                     f"{limit:.4g}: {status}")


def _kl_part(held: Arm, kd: Arm, margin: float, alpha: float) -> CheckPart:
    moments = from_standard_errors(("held", "kd", "parent"), (held.kl, kd.kl, np.array([held.parent.kl])),
                                   (held.kl_stderr, kd.kl_stderr, np.array([held.parent.kl_stderr])))
    combo = moments.combine([1.0, -(1.0 - margin), -margin])
    value = combo.interval(alpha)[1]
    status = _status(value, 0.0)
    kl_h, kl_k, kl_p = moments.means
    statement = (f"output KL to the teacher: held {kl_h:.4g}, kd {kl_k:.4g}, parent {kl_p:.4g}; held may leave "
                 f"{margin:g} of kd's KL reduction: upper bound of KL(held) - {1 - margin:g} KL(kd) - {margin:g} "
                 f"KL(parent) = {value:.4g} vs 0 ({1 - alpha:g} interval, df {combo.df:.3g}): {status}")
    if status == FAILED:
        statement += " -- the constraint did not hold while the outputs matched the teacher"
    elif status == NOT_EVALUATED:
        statement += " (a KL or its standard error is missing)"
    return CheckPart("kl", status, True, value, 0.0, statement)


def check(held: Arm, kd: Arm, settings: AnalysisSettings, allowed_fraction: float = 0.0) -> ManipulationCheck:
    """The manipulation check of one held arm against kd on their damaged parent (module docstring)."""
    parts = (_cka_part(held, kd, allowed_fraction, settings.held_cka_margin),
             *(_similarity_part(held, m) for m in OTHER_SIMILARITY),
             _kl_part(held, kd, settings.kl_margin, settings.alpha))
    return ManipulationCheck(held.model, held.degradation, held.recovery, kd.recovery, allowed_fraction, parts)


def checks_of_arms(arms: Arms, settings: AnalysisSettings, *, held: str | None = None, kd: str | None = None,
                   allowed_fraction: Mapping[str, float] | None = None) -> tuple[ManipulationCheck, ...]:
    """The check on every damaged parent with a held and a kd arm (chosen as in realign.analysis.estimand).
    `allowed_fraction` maps a held arm's configured name to its dose (0 when absent): the table does not carry
    the recovery's parameters."""
    fractions = dict(allowed_fraction or {})
    out = []
    for on_parent in arms.values():
        h, k = pick(on_parent, HELD_METHOD, held), pick(on_parent, KD_METHOD, kd)
        if h is not None and k is not None:
            out.append(check(h, k, settings, float(fractions.get(h.recovery, 0.0))))
    return tuple(out)


def manipulation_checks(table: pd.DataFrame, settings: AnalysisSettings | None = None, *, held: str | None = None,
                        kd: str | None = None, allowed_fraction: Mapping[str, float] | None = None,
                        **overrides) -> tuple[ManipulationCheck, ...]:
    """:func:`checks_of_arms` on the arms of the analysis table."""
    return checks_of_arms(arms_by_parent(table), AnalysisSettings.resolve(settings, **overrides), held=held, kd=kd,
                          allowed_fraction=allowed_fraction)
