"""The association across arms (a description, not the pre-registered test: that is realign.analysis.theta): does
recovery go with re-alignment of hidden-layer geometry? Its rules, thresholds and reasons.

Decision rules (alpha, min_effect, min_n, min_n_ci come from the config ``analysis:`` block through
realign.analysis.settings; RECOVERED_MIN and NO_RECOVERY_MAX are fixed here)
--------------------------------------------------------------------------------------------------------
0. n < min_n (default 4) analysed artifacts -> **inconclusive**, reason "too few artifacts".
1. **refuted** if either falsification pattern named by the paper appears with confidence:
   a. a counterexample: an analysed artifact with ``recovery_fraction >= 0.5`` whose gain over its parent
      is beyond noise (``gain_within_noise`` False) while ``delta_cka <= 0`` (performance recovered, geometry
      did not re-align: the paper's "performance recovers while CKA stays low"); or
   b. the Spearman bootstrap CI upper bound is < min_effect (the data exclude a correlation as strong as the
      minimum effect: across artifacts, recovery and CKA re-alignment do not go together, which is what both
      of the paper's criteria amount to in aggregate), provided n >= ``min_n_ci`` (default 8; percentile
      bootstrap CIs on fewer rows are too unreliable to refute with).
   The paper's other criterion, "CKA rises without performance", is also checked per artifact
   (``cka_without_recovery``: a CKA rise at least the median positive rise with |recovery fraction| < 0.1)
   and stated in the reasons, but it is descriptive: a single artifact's lack of recovery is not tested
   against noise, so it enters the verdict only through rule 1b.
   Refuted takes precedence over supported: the paper names these patterns as what would falsify the causal
   claim; the reasons then also say whether the correlation criteria were met.
2. **supported** if ALL of: Spearman rho >= min_effect with permutation p < alpha; AND the OLS coefficient of
   delta_cka is > 0 with p < alpha in a model that also contains delta_kl (geometry beyond output matching).
3. **inconclusive** otherwise, with the criteria that failed as reasons.

The reasons always begin with the paper's two falsification criteria, each stated as observed or not, then
the across-artifact CI rule, then the criteria for "supported".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from realign.analysis.selection import artifact_label
from realign.analysis.settings import AnalysisSettings

RECOVERED_MIN = 0.5  # rule 1a: a recovery fraction at least this is "performance recovered"
NO_RECOVERY_MAX = 0.1  # cka_without_recovery: |recovery fraction| below this is "no recovery"


def counterexamples(d: pd.DataFrame) -> list[dict]:
    """Rule 1a's artifacts among the analysed rows ``d``: recovery fraction >= RECOVERED_MIN, gain beyond
    noise, delta_cka <= 0. Each: artifact, recovery_fraction, delta_cka."""
    gain_noise = d["gain_within_noise"] if "gain_within_noise" in d else pd.Series(False, index=d.index)
    ce = d[(d["recovery_fraction"] >= RECOVERED_MIN) & (d["delta_cka"] <= 0) & ~gain_noise.astype(bool)]
    return [{"artifact": artifact_label(r), "recovery_fraction": r["recovery_fraction"], "delta_cka": r["delta_cka"]}
            for _, r in ce.iterrows()]


def cka_without_recovery(d: pd.DataFrame) -> list[dict]:
    """The descriptive per-artifact check of "CKA rises without performance" among the analysed rows ``d``: a
    CKA rise at least the median positive rise with |recovery fraction| < NO_RECOVERY_MAX. Each: artifact,
    recovery_fraction, delta_cka."""
    x = d["delta_cka"].to_numpy(float)
    if not (np.isfinite(x).any() and x.size):
        return []
    pos = x[x > 0]
    thr = float(np.median(pos)) if pos.size else math.inf
    cw = d[(d["delta_cka"] >= thr) & (d["recovery_fraction"].abs() < NO_RECOVERY_MAX)]
    return [{"artifact": artifact_label(r), "recovery_fraction": r["recovery_fraction"], "delta_cka": r["delta_cka"]}
            for _, r in cw.iterrows()]


def _fmt(x, nd=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _names(items: list[dict]) -> str:
    return ", ".join(c["artifact"] for c in items)


def decide(out: dict, settings: AnalysisSettings) -> tuple[str, list[str]]:
    """(verdict, reasons) by the rules of the module docstring, from the results of realign.analysis.stats.analyze
    (n, correlations.spearman, ols, mixed_model, counterexamples, cka_without_recovery). The reasons come in a
    fixed order: the paper's two falsification criteria (each observed or not), the across-artifact CI rule,
    the supported criteria."""
    alpha, min_effect, min_n_ci = settings.alpha, settings.min_effect, settings.min_n_ci
    n = out["n"]
    sp = out["correlations"]["spearman"]
    rho, p, lo, hi = sp["estimate"], sp["p_perm"], sp["ci_low"], sp["ci_high"]
    ols = out["ols"] or {}
    reasons: list[str] = []

    # Criterion 1, per artifact: decides the verdict (rule 1a).
    ce = out["counterexamples"]
    refuted_by_counterexample = bool(ce)
    if ce:
        reasons.append(
            "falsification criterion 'performance recovers while CKA stays low': OBSERVED (refutes) in "
            f"{len(ce)} artifact(s) with recovery fraction >= {RECOVERED_MIN}, gain beyond noise and delta_cka "
            f"<= 0: {_names(ce)}"
        )
    else:
        reasons.append(
            "falsification criterion 'performance recovers while CKA stays low': not observed (no analysed "
            f"artifact has recovery fraction >= {RECOVERED_MIN} with gain beyond noise while delta_cka <= 0)"
        )

    # Criterion 2, per artifact: descriptive only (module docstring, rule 1); it is tested across artifacts
    # by the CI rule below.
    cw = out["cka_without_recovery"]
    if cw:
        reasons.append(
            f"falsification criterion 'CKA rises without performance': seen in {len(cw)} artifact(s) whose CKA "
            f"rise is at least the median rise with |recovery fraction| < {NO_RECOVERY_MAX}: {_names(cw)} "
            "(descriptive: a single artifact's missing recovery is not tested against noise; the criterion is "
            "decided across artifacts by the correlation CI)"
        )
    else:
        reasons.append(
            "falsification criterion 'CKA rises without performance': not seen in any artifact (no CKA rise of "
            f"at least the median rise with |recovery fraction| < {NO_RECOVERY_MAX})"
        )

    # Rule 1b: across artifacts, the data exclude a correlation as strong as min_effect.
    refuted_by_ci = False
    if hi is None:
        reasons.append("across artifacts: the Spearman bootstrap CI is undefined, so the data cannot exclude "
                       "a correlation")
    elif hi < min_effect and n >= min_n_ci:
        refuted_by_ci = True
        reasons.append(
            f"across artifacts: Spearman rho CI [{_fmt(lo)}, {_fmt(hi)}] excludes correlations >= min_effect "
            f"{min_effect}: recovery does not go with CKA re-alignment (OBSERVED, refutes)"
        )
    elif hi < min_effect:
        reasons.append(
            f"across artifacts: Spearman CI upper bound {_fmt(hi)} < {min_effect}, but n={n} < {min_n_ci} is too "
            "few to refute"
        )
    else:
        reasons.append(
            f"across artifacts: Spearman rho CI [{_fmt(lo)}, {_fmt(hi)}] reaches min_effect {min_effect}, so the "
            "data do not exclude the claimed association (not observed)"
        )

    rho_ok = rho is not None and math.isfinite(rho) and rho >= min_effect
    p_ok = p is not None and p < alpha
    corr_ok = rho_ok and p_ok
    if corr_ok:
        reasons.append(f"Spearman rho = {_fmt(rho)} >= {min_effect} with permutation p = {_fmt(p, 4)} < {alpha}")
    elif rho is None or not math.isfinite(rho):
        reasons.append("Spearman rho undefined (delta_cka or recovery fraction constant)")
    elif not rho_ok:
        reasons.append(f"Spearman rho = {_fmt(rho)} is below the minimum effect {min_effect}")
    else:
        reasons.append(f"Spearman rho = {_fmt(rho)} but permutation p = {_fmt(p, 4)} is not < {alpha}")

    coef = (ols.get("coefficients") or {}).get("delta_cka")
    ols_ok = False
    if "error" in ols:
        reasons.append(f"OLS not available: {ols['error']}")
    elif coef is None:
        reasons.append("OLS has no delta_cka coefficient")
    elif not ols.get("includes_delta_kl"):
        reasons.append("OLS could not include delta_kl, so geometry cannot be tested beyond output matching")
    else:
        c, cp = coef["coef"], coef["p"]
        ols_ok = math.isfinite(c) and c > 0 and math.isfinite(cp) and cp < alpha
        if ols_ok:
            reasons.append(
                f"OLS delta_cka coefficient {_fmt(c, 3)} > 0 beyond delta_kl (HC3 p = {_fmt(cp, 4)} < {alpha})"
            )
        else:
            reasons.append(
                f"OLS delta_cka coefficient {_fmt(c, 3)} (HC3 p = {_fmt(cp, 4)}) is not positive and "
                f"significant at {alpha} beyond delta_kl"
            )

    mm = out.get("mixed_model") or {}
    mm_coef = (mm.get("coefficients") or {}).get("delta_cka")
    if mm_coef:
        reasons.append(
            f"mixed model with a random intercept per base model ({mm['n_groups']} models): delta_cka coefficient "
            f"{_fmt(mm_coef['coef'], 3)} (Wald p = {_fmt(mm_coef['p'], 4)}); reported, not a verdict criterion"
        )

    if refuted_by_counterexample or refuted_by_ci:
        if corr_ok and ols_ok:
            reasons.append("(the correlation criteria for 'supported' were met, but the falsification pattern "
                           "takes precedence)")
        return "refuted", reasons
    if corr_ok and ols_ok:
        return "supported", reasons
    return "inconclusive", reasons


def summary(out: dict) -> str:
    """One paragraph for the report: the verdict and the primary statistic (results with a verdict)."""
    sp = out["correlations"]["spearman"]
    lvl = int(round(100 * sp["ci_level"]))
    core = (
        f"n = {out['n']} recovered artifacts; Spearman rho(delta CKA, recovery fraction) = {_fmt(sp['estimate'])} "
        f"({lvl}% bootstrap CI {_fmt(sp['ci_low'])} to {_fmt(sp['ci_high'])}, permutation p = "
        f"{_fmt(sp['p_perm'], 4)})."
    )
    v = out["association"]
    if v == "supported":
        return ("Supported: in these artifacts, recovery goes with CKA re-alignment beyond output matching; " + core +
                " This is an association across these artifacts, not proof of a causal mechanism.")
    if v == "refuted":
        return "Refuted: the data show the falsification pattern named by the paper. " + core
    return "Inconclusive: the data neither support nor refute the claim at the pre-set thresholds. " + core
