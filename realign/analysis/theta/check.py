"""The manipulation check of the held arm, made per arm (issue 28): did the clamp hold re-alignment down while the
outputs still matched the teacher?

Each part is a per-seed pivot whose one-sided upper 1 - alpha bound (a 95 % upper bound at alpha 0.05) must be
<= 0 (realign.analysis.theta.paired: shared probe or prompt noise at z from the paired replicates of distinct
seeds, the seed part pooled across the eligible damages in units of kd's quantity, at t with the pooled df):

* **CKA** (required): D_s = dCKA_held,s - (f + held_cka_margin) dCKA_kd,s, f the held arm's hold_fraction; held,
  kd and the parent on the same resampled probe sequences (the table's `delta_cka_boot`).
* **KL** (required): K_s = KL_held,s - (1 - kl_margin) KL_kd,s - kl_margin KL_parent, on one bootstrap over the
  divergence prompts (the table's `kl_prompts`); without per-prompt KL each run's kl_stderr as independent noise
  (errs wide; the statement says so).
* **H2** (RBF CKA, Procrustes, mutual k-NN; never required): the CKA part's pivot on the measure's layer mean. It
  needs every run's replicates of that measure on the same probe resamples; the similarity step computes them for
  damaged parents only (measure.jackknife_groups), so today these parts are "not evaluated" and the statement gives
  the point value of the pivot. A part that fails makes H2 "not tested by this intervention" for that measure.

The check reads the arm's mean: one more seed shrinks the seed part (C / S) and raises the pooled df, so a
perfectly clamped arm passes at least as often with more seeds (tests/test_theta_check.py simulates it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realign.analysis.arms import OTHER_SIMILARITY
from realign.analysis.theta.damage import Damage
from realign.analysis.theta.paired import Paired, pool_seed_covariance

PASSED, FAILED, NOT_EVALUATED = "passed", "failed", "not evaluated"
REQUIRED = ("delta_cka", "kl")


@dataclass(frozen=True)
class CheckPart:
    """One part: the pivot's point value, its upper bound (compared with 0), status, whether H1 requires it."""
    name: str
    status: str
    required: bool
    value: float
    upper: float
    df: float
    statement: str


@dataclass(frozen=True)
class ArmCheck:
    """The check of the held arm on one damage."""
    damage: str
    held: str
    kd: str
    allowed_fraction: float
    parts: tuple[CheckPart, ...]

    @property
    def passed(self) -> bool:
        """The CKA and KL parts passed (H2 never blocks H1)."""
        return all(p.status == PASSED for p in self.parts if p.required)

    @property
    def failures(self) -> tuple[CheckPart, ...]:
        return tuple(p for p in self.parts if p.required and p.status != PASSED)

    @property
    def h2(self) -> str:
        """H2's status: "held" when every measure's part passed, "not tested by this intervention" when one
        failed, "not evaluated" otherwise."""
        others = [p for p in self.parts if not p.required]
        if any(p.status == FAILED for p in others):
            return "not tested by this intervention: " + ", ".join(p.name for p in others if p.status == FAILED)
        if others and all(p.status == PASSED for p in others):
            return "held"
        return NOT_EVALUATED


def _status(upper: float) -> str:
    if not math.isfinite(upper):
        return NOT_EVALUATED
    return PASSED if upper <= 0 else FAILED


def _dose(d: Damage) -> float:
    f = d.held.hold_fraction
    return float(f) if math.isfinite(f) else 0.0


def checks(damages: Sequence[Damage], settings) -> tuple[ArmCheck, ...]:
    """The per-arm check of the held arm on each of `damages` (the eligible ones with a held arm)."""
    roles = ("held", "kd")
    required = required_parts([d.delta_cka(roles) for d in damages],
                              [d.kl(roles, settings.n_boot, settings.seed) for d in damages],
                              [_dose(d) for d in damages], settings)
    return tuple(ArmCheck(d.label, d.held.recovery, d.kd.recovery, _dose(d),
                          (*parts, *(_h2_part(d, m, _dose(d) + settings.held_cka_margin) for m in OTHER_SIMILARITY)))
                 for d, parts in zip(damages, required))


def required_parts(ckas: Sequence[Paired], kls: Sequence[Paired], doses: Sequence[float], settings
                   ) -> list[tuple[CheckPart, CheckPart]]:
    """The CKA and KL parts on paired delta CKA ("held", "kd") and KL ("held", "kd", "parent"), seed parts pooled
    across the damages given: the form the power simulation calls."""
    level = 1 - settings.alpha
    cka_seed, kl_seed = pool_seed_covariance(ckas), pool_seed_covariance(kls)
    out = []
    for cka, kl, f in zip(ckas, kls, doses):
        m = settings.kl_margin
        limit = f + settings.held_cka_margin
        c = cka.combine(cka.coef({"held": 1.0, "kd": -limit}), cka_seed)
        upper = c.upper(level)
        noise = "paired probe bootstrap" if cka.replicates is not None else \
            "each run's interval as independent noise (no paired replicates in the table: errs wide)"
        cka_part = CheckPart("delta_cka", _status(upper), True, c.estimate, upper, c.df, (
            f"mean delta CKA held {cka.means[0]:.4g} - ({f:g} + {settings.held_cka_margin:g}) x kd's "
            f"{cka.means[1]:.4g} = {c.estimate:.4g}, upper {level:.0%} bound {upper:.4g} vs 0 "
            f"({cka.n_seeds} paired seed(s), {noise}, seed df {c.df:.3g}): {_status(upper)}"))
        k = kl.combine(kl.coef({"held": 1.0, "kd": -(1 - m), "parent": -m}), kl_seed)
        k_upper = k.upper(level)
        k_noise = "paired prompt bootstrap" if kl.replicates is not None else \
            "each run's kl_stderr as independent noise (no per-prompt KL in the table: errs wide)"
        kl_part = CheckPart("kl", _status(k_upper), True, k.estimate, k_upper, k.df, (
            f"KL to the teacher: held {kl.means[0]:.4g}, kd {kl.means[1]:.4g}, parent {kl.means[2]:.4g}; "
            f"KL(held) - {1 - m:g} KL(kd) - {m:g} KL(parent) = {k.estimate:.4g}, upper {level:.0%} bound "
            f"{k_upper:.4g} vs 0 ({k_noise}): {_status(k_upper)}"
            + (" -- the clamp did not hold while the outputs matched" if _status(k_upper) == FAILED else "")))
        out.append((cka_part, kl_part))
    return out


def _h2_part(d: Damage, measure: str, limit: float) -> CheckPart:
    """Not evaluated without per-run replicates of the measure (module docstring); the point pivot is stated."""
    held, kd = d.held.similarity.get(measure), d.kd.similarity.get(measure)
    base = d.kd.parent.similarity.get(measure, math.nan)
    if held is None or kd is None or not math.isfinite(base):
        return CheckPart(measure, NOT_EVALUATED, False, math.nan, math.nan, math.nan, f"{measure}: not in the table")
    value = float(np.mean(held) - base - limit * (np.mean(kd) - base))
    return CheckPart(measure, NOT_EVALUATED, False, value, math.nan, math.nan,
                     f"{measure}: held's rise minus {limit:g} x kd's rise = {value:.4g} (point value); not "
                     "evaluated: the runs carry no replicates of this measure on the probe resamples "
                     "(the similarity step computes them for damaged parents only)")
