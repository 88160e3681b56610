"""The pre-registered verdict (issue 28; docs/2026-12-06-statistics-reanalysis.md, part 1), applied by one function
to the eligibility, theta, the per-arm check and H1'.

Per damage, in this order:
1. "ineligible" (realign.analysis.theta.eligibility), with its reasons;
2. "refuted" when H1' is refuted (its Holm p < alpha / 2), or when H1 is refuted (theta's Holm-adjusted refute p
   < alpha / 2: with one damage, the upper bound of the two-sided 1 - alpha interval below theta_refute) with the
   check's CKA and KL parts passed;
3. "check failed" when the CKA or KL part failed (or could not be evaluated);
4. "supported" when H1 is supported (Holm support p < alpha / 2: the lower bound above theta_support);
5. "inconclusive".
A damage where H1 is supported while H1' refutes is "refuted", and the reason says both. H1 and H1' decide only
where their intervals hold the training seeds' variance (a pooled seed covariance with df >= 1): with one seed per
arm on every tested damage that variance is unmeasured, H1 is "inconclusive" and H1' "not tested", and the reasons
say why. (Added 2026-12-07, after the confirmatory study's pre-registration at 34982ce and before any of its
results, when the one-seed demonstration config showed a verdict from an interval of items alone; it cannot change
that study, which has six seeds per arm: docs/2026-12-07-confirmatory.md.)

Overall: "refuted" when H1 or H1' is refuted on at least one eligible damage and H1 is supported on none; "mixed"
when refuted on some and supported on others; "supported" only when H1 is supported on every eligible damage with
at least two families eligible; otherwise "inconclusive", with one line per family.

Error rates: each per-damage test runs at alpha / 2 after Holm within its family (refute, support, H1'), so a false
refutation by H1 or H1' stays within alpha (Bonferroni over the two) and a false support within alpha / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from realign.analysis.theta.check import ArmCheck
from realign.analysis.theta.eligibility import Eligibility
from realign.analysis.theta.estimator import ThetaDamage
from realign.analysis.theta.h1prime import OnlyTest

REFUTED, SUPPORTED, INCONCLUSIVE, MIXED = "refuted", "supported", "inconclusive", "mixed"
CHECK_FAILED, INELIGIBLE = "check failed", "ineligible"


@dataclass(frozen=True)
class DamageVerdict:
    damage: str
    family: str
    outcome: str
    reasons: tuple[str, ...]
    h1: str        # refuted / supported / inconclusive / not tested
    h1prime: str   # refuted / not refuted / not tested
    h2: str
    sentence: str = ""  # the outcome in words, for the verdict box


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    damages: tuple[DamageVerdict, ...]
    lines: tuple[str, ...]  # one sentence per damage, family by family


def _theta_text(t: ThetaDamage) -> str:
    seeds = f"seed df {t.df:.3g}" if t.seed_variance_measured else "the seeds' variance unmeasured"
    return f"theta {t.theta:.3f} [{t.low:.3f}, {t.high:.3f}] ({t.level:.0%}, {len(t.seeds)} paired seeds, {seeds})"


def damage_verdict(e: Eligibility, theta: ThetaDamage | None, check: ArmCheck | None, only: OnlyTest | None,
                   settings) -> DamageVerdict:
    """One damage's outcome by the rules of the module docstring."""
    level = settings.alpha / 2
    if not e.eligible:
        first = e.reasons[0] if e.reasons else "not eligible"
        return DamageVerdict(e.damage, e.family, INELIGIBLE, e.reasons, "not tested", "not tested", "not tested",
                             f"{e.damage} ({e.family}): not tested, as it is not eligible ({first}).")
    h1p = "not tested"
    reasons: list[str] = []
    if only is not None and not only.seed_variance_measured:
        reasons.append(f"H1' ({only.arm}): not tested, one seed per arm leaves the training seeds' variance "
                       "unmeasured")
    elif only is not None:
        fired = math.isfinite(only.p_holm) and only.p_holm < level
        h1p = REFUTED if fired else "not refuted"
        reasons.append(f"H1' ({only.arm}): delta CKA {only.delta_cka:.4g} vs {only.cka_threshold:.4g} "
                       f"(p {only.p_cka_rise:.3g}), gain {only.gain:.4g} vs {only.gain_threshold:.4g} "
                       f"(p {only.p_short:.3g}); Holm p {only.p_holm:.3g} vs {level:g}: {h1p}")
    h2 = check.h2 if check is not None else "not tested"
    if theta is None or check is None:
        h1 = "not tested"
        reasons.append("no alignment-held arm on this damage: H1 not tested")
    else:
        refute = math.isfinite(theta.p_refute_holm) and theta.p_refute_holm < level
        support = math.isfinite(theta.p_support_holm) and theta.p_support_holm < level
        reasons.append(f"H1: {_theta_text(theta)}; refute Holm p {theta.p_refute_holm:.3g}, support Holm p "
                       f"{theta.p_support_holm:.3g} vs {level:g}")
        if not check.passed:
            h1 = CHECK_FAILED
            reasons += [f"check: {p.statement}" for p in check.failures]
        elif not theta.seed_variance_measured:
            h1 = INCONCLUSIVE
            reasons.append("H1 cannot decide: one seed per arm leaves the training seeds' variance out of theta's "
                           "interval")
        else:
            h1 = REFUTED if refute else SUPPORTED if support else INCONCLUSIVE
    if h1p == REFUTED:
        outcome = REFUTED
        if h1 == SUPPORTED:
            reasons.append("H1 is supported here too: re-alignment is necessary for kd's recovery but not "
                           "sufficient for recovery")
    elif h1 == REFUTED:
        outcome = REFUTED
    elif h1 == CHECK_FAILED:
        outcome = CHECK_FAILED
    elif h1 == SUPPORTED:
        outcome = SUPPORTED
    else:
        outcome = INCONCLUSIVE
    return DamageVerdict(e.damage, e.family, outcome, tuple(reasons), h1, h1p, h2,
                         _sentence(e, theta, outcome, h1, h1p))


def _sentence(e: Eligibility, theta: ThetaDamage | None, outcome: str, h1: str, h1p: str) -> str:
    """One damage's outcome in words."""
    where = f"{e.damage} ({e.family})"
    if theta is None:
        said = "no alignment-held arm, so H1 is not tested"
    else:
        said = f"theta = {theta.theta:.2f} [{theta.low:.2f}, {theta.high:.2f}]"
        said += {REFUTED: ": holding re-alignment down cost little of kd's recovery",
                 SUPPORTED: ": holding re-alignment down cost most of kd's recovery",
                 CHECK_FAILED: ", but the held arm's manipulation check failed, so theta cannot decide",
                 INCONCLUSIVE: ": the interval does not decide between the thresholds"
                 if theta.seed_variance_measured else
                 ": with one training seed per arm its interval leaves out the seeds' variance, so it cannot decide"
                 }.get(h1, f" (H1 {h1})")
    if h1p == REFUTED:
        said += "; the alignment-only arm re-aligned without recovering (H1' refuted)"
    return f"{where}: {said} — {outcome}."


def overall(verdicts: Sequence[DamageVerdict]) -> Verdict:
    """The study's verdict from the per-damage ones (module docstring)."""
    eligible = [v for v in verdicts if v.outcome != INELIGIBLE]
    refuted = [v for v in eligible if v.outcome == REFUTED]
    supported = [v for v in eligible if v.h1 == SUPPORTED]
    families = sorted({v.family for v in verdicts})
    lines = [v.sentence or f"{v.damage} ({v.family}): {v.outcome}."
             for family in families for v in verdicts if v.family == family]
    if refuted and not supported:
        outcome = REFUTED
        reason = ("refuted on " + ", ".join(v.damage for v in refuted)
                  + " and supported on no eligible damage")
    elif refuted and supported:
        outcome = MIXED
        reason = (f"refuted on {', '.join(v.damage for v in refuted)}, supported on "
                  f"{', '.join(v.damage for v in supported)}")
    elif eligible and len(supported) == len(eligible) and len({v.family for v in eligible}) >= 2:
        outcome = SUPPORTED
        reason = f"H1 supported on every eligible damage ({len(eligible)}, {len({v.family for v in eligible})} families)"
    else:
        outcome = INCONCLUSIVE
        if not eligible:
            reason = "no damage is eligible"
        elif eligible and len(supported) == len(eligible):
            reason = "H1 supported on every eligible damage, but fewer than two families are eligible"
        else:
            reason = "no eligible damage decides"
    return Verdict(outcome, reason, tuple(verdicts), tuple(lines))
