"""Does recovery go with re-alignment of hidden-layer geometry?  Correlations, OLS and the verdict.

The analysed set: rows with ``degradation != "none"``, ``recovery != "none"``, damage *not* within noise, and
finite ``recovery_fraction`` and ``delta_cka`` (see :mod:`realign.analysis.table`).

Statistics
----------
* Spearman (primary) and Pearson correlation of ``delta_cka`` with ``recovery_fraction``; percentile
  bootstrap CIs (rows resampled with replacement; degenerate resamples with a constant variable are dropped)
  and two-sided permutation p-values ``(1 + #{|r_perm| >= |r_obs|}) / (n_perm + 1)``. All randomness comes
  from ``numpy.random.default_rng(seed)``; the same inputs and seed give the same numbers.
* Partial correlations (Pearson and Spearman) of ``delta_cka`` with ``recovery_fraction`` controlling for
  ``delta_kl`` (does geometry go with recovery beyond output matching?), same bootstrap / permutation scheme
  (permutation of ``recovery_fraction``; reported, not used by the verdict).
* OLS ``recovery_fraction ~ delta_cka + delta_kl [+ C(family)]`` with HC3 heteroscedasticity-robust standard
  errors and t-based p-values / CIs (``use_t=True``, conservative at small n). ``C(family)`` is added when
  there are >1 families, every family has >= 2 analysed rows and the residual degrees of freedom stay >= 2.
  Terms that make the design rank-deficient are dropped (family first, then delta_kl) and noted.

Decision rules (alpha and min_effect come from the config)
----------------------------------------------------------
0. n < 4 analysed artifacts -> **inconclusive**, reason "too few artifacts".
1. **refuted** if either falsification pattern named by the paper appears with confidence:
   a. a counterexample: an analysed artifact with ``recovery_fraction >= 0.5`` whose gain over its parent
      is beyond noise (``gain_within_noise`` False) while ``delta_cka <= 0`` (performance recovered, geometry
      did not re-align); or
   b. the Spearman bootstrap CI upper bound is < min_effect (the data exclude a correlation as strong as the
      minimum effect), provided n >= ``min_n_ci`` (default 8; percentile bootstrap CIs on fewer rows are
      too unreliable to refute with).
   Refuted takes precedence over supported: the paper names these patterns as what would falsify the causal
   claim; the reasons then also say whether the correlation criteria were met.
2. **supported** if ALL of: Spearman rho >= min_effect with permutation p < alpha; AND the OLS coefficient of
   delta_cka is > 0 with p < alpha in a model that also contains delta_kl (geometry beyond output matching).
3. **inconclusive** otherwise, with the criteria that failed as reasons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from realign.config import parse_recovery_name

RECOVERED_MIN = 0.5


# ----------------------------------------------------------------------------------------------- helpers


def jsonable(obj: Any) -> Any:
    """Recursively convert numpy / pandas scalars to Python types and NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if obj is None or isinstance(obj, str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def _pearson_rows(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of two (B, n) arrays; NaN where a row is constant."""
    Xc = X - X.mean(axis=1, keepdims=True)
    Yc = Y - Y.mean(axis=1, keepdims=True)
    num = (Xc * Yc).sum(axis=1)
    den = np.sqrt((Xc * Xc).sum(axis=1) * (Yc * Yc).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r[~(den > 1e-12 * np.maximum(1.0, np.abs(num)))] = np.nan
    return np.clip(r, -1.0, 1.0)


def _partial_rows(X, Y, Z) -> np.ndarray:
    rxy, rxz, ryz = _pearson_rows(X, Y), _pearson_rows(X, Z), _pearson_rows(Y, Z)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    r[~np.isfinite(r)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _rank(A: np.ndarray) -> np.ndarray:
    return sps.rankdata(A, axis=-1)


def _ci(boot: np.ndarray, alpha: float) -> tuple[float | None, float | None, int]:
    ok = boot[np.isfinite(boot)]
    if ok.size < max(10, boot.size // 2):
        return None, None, int(ok.size)
    lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(ok.size)


def _perm_p(obs: float, perm: np.ndarray) -> float | None:
    if not math.isfinite(obs):
        return None
    perm = perm[np.isfinite(perm)]
    if perm.size == 0:
        return None
    return float((1 + np.sum(np.abs(perm) >= abs(obs) - 1e-12)) / (perm.size + 1))


def _correlation(x, y, z, method: str, alpha, n_boot, n_perm, rng) -> dict:
    """method in pearson, spearman, partial_pearson, partial_spearman (z = control)."""
    n = len(x)
    rankit = method.endswith("spearman")
    partial = method.startswith("partial")

    def stat(X, Y, Z):
        if rankit:
            X, Y = _rank(X), _rank(Y)
            Z = _rank(Z) if Z is not None else None
        return _partial_rows(X, Y, Z) if partial else _pearson_rows(X, Y)

    x2, y2 = x[None, :], y[None, :]
    z2 = z[None, :] if z is not None else None
    est = float(stat(x2, y2, z2)[0])

    idx = rng.integers(0, n, size=(n_boot, n))
    boot = stat(x[idx], y[idx], z[idx] if z is not None else None)
    lo, hi, n_ok = _ci(boot, alpha)

    perm_idx = np.argsort(rng.random((n_perm, n)), axis=1)
    Xp = np.broadcast_to(x, (n_perm, n))
    Zp = np.broadcast_to(z, (n_perm, n)) if z is not None else None
    perm = stat(Xp, y[perm_idx], Zp)
    p = _perm_p(est, perm)
    return {
        "estimate": est,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": 1 - alpha,
        "p_perm": p,
        "n": n,
        "n_boot_valid": n_ok,
    }


def _ols(d: pd.DataFrame, alpha: float) -> dict:
    import statsmodels.formula.api as smf

    notes: list[str] = []
    n = len(d)
    fam_counts = d["family"].value_counts() if "family" in d else pd.Series(dtype=int)
    use_family = len(fam_counts) > 1 and int(fam_counts.min()) >= 2 and n - (3 + len(fam_counts) - 1) >= 2
    if len(fam_counts) > 1 and not use_family:
        notes.append("C(family) left out: too few rows per family for the residual degrees of freedom")
    use_kl = bool(np.isfinite(d["delta_kl"]).all()) if "delta_kl" in d else False
    if not use_kl:
        notes.append("delta_kl left out: missing values")

    def build(kl: bool, fam: bool):
        terms = ["delta_cka"] + (["delta_kl"] if kl else []) + (["C(family)"] if fam else [])
        formula = "recovery_fraction ~ " + " + ".join(terms)
        model = smf.ols(formula, data=d)
        ok = np.linalg.matrix_rank(model.exog) == model.exog.shape[1] and n - model.exog.shape[1] >= 1
        return formula, model, ok

    formula, model, ok = build(False, False)
    if not ok:
        return {"error": "design matrix rank-deficient (delta_cka constant?)", "notes": notes, "n": n}
    if use_kl:
        _, _, ok = build(True, False)
        if not ok:
            use_kl = False
            notes.append("delta_kl dropped: collinear with delta_cka or constant")
    if use_family:
        _, _, ok = build(use_kl, True)
        if not ok:
            use_family = False
            notes.append("C(family) dropped: design rank-deficient or no residual degrees of freedom")
    formula, model, _ = build(use_kl, use_family)

    fit = model.fit(cov_type="HC3", use_t=True)
    ci = fit.conf_int(alpha=alpha)
    coefs = {}
    for name in fit.params.index:
        coefs[name] = {
            "coef": float(fit.params[name]),
            "se": float(fit.bse[name]),
            "ci_low": float(ci.loc[name, 0]),
            "ci_high": float(ci.loc[name, 1]),
            "p": float(fit.pvalues[name]),
        }
    return {
        "formula": formula,
        "cov_type": "HC3",
        "n": int(fit.nobs),
        "df_resid": float(fit.df_resid),
        "r2": float(fit.rsquared),
        "r2_adj": float(fit.rsquared_adj),
        "coefficients": coefs,
        "includes_delta_kl": use_kl,
        "includes_family": use_family,
        "notes": notes,
    }


def _label(row) -> str:
    return f"{row['model']}/{row['degradation']}/{row['recovery']}"


def select_analysed(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The rows the statistics use, and the excluded candidate rows with the reason."""
    cand = table[(table["degradation"] != "none") & (table["recovery"] != "none")]
    keep, excluded = [], []
    for i, row in cand.iterrows():
        reason = None
        if bool(row.get("checkpoint", False)):
            reason = "checkpoint (dose-response, not an independent arm)"
        elif bool(row.get("damage_within_noise", False)):
            reason = "damage within noise"
        elif not np.isfinite(float(row["recovery_fraction"])):
            reason = "recovery fraction undefined"
        elif not np.isfinite(float(row["delta_cka"])):
            reason = "delta_cka missing"
        if reason:
            excluded.append({"artifact": _label(row), "reason": reason})
        else:
            keep.append(i)
    return cand.loc[keep].copy(), excluded


# ----------------------------------------------------------------------------------------------- analyze


def analyze(
    table: pd.DataFrame,
    alpha: float = 0.05,
    min_effect: float = 0.3,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    *,
    min_n: int = 4,
    min_n_ci: int = 8,
) -> dict:
    """Correlations, partial correlations, OLS and the verdict (rules in the module docstring).

    Returns a JSON-serialisable dict with keys: n, n_candidates, excluded, settings, performance_metric,
    correlations {spearman, pearson, partial_pearson, partial_spearman}, ols, counterexamples,
    cka_without_recovery, verdict, reasons, summary.
    """
    d, excluded = select_analysed(table)
    n = len(d)
    perf = None
    if "performance_metric" in table and len(table):
        perf = str(table["performance_metric"].iloc[0])
    out: dict[str, Any] = {
        "n": n,
        "n_candidates": n + len(excluded),
        "excluded": excluded,
        "settings": {
            "alpha": alpha, "min_effect": min_effect, "n_boot": n_boot, "n_perm": n_perm, "seed": seed,
            "min_n": min_n, "min_n_ci": min_n_ci, "recovered_min": RECOVERED_MIN,
            "primary": "spearman",
        },
        "performance_metric": perf,
        "correlations": {},
        "ols": None,
        "counterexamples": [],
        "cka_without_recovery": [],
    }
    if n < min_n:
        out["verdict"] = "inconclusive"
        out["reasons"] = [f"too few artifacts: n={n} analysed (need >= {min_n}); no statistics computed"]
        out["summary"] = (
            f"Inconclusive: only {n} recovered artifact(s) with damage beyond noise; "
            "the data cannot say whether recovery goes with CKA re-alignment."
        )
        return jsonable(out)

    rng = np.random.default_rng(seed)
    x = d["delta_cka"].to_numpy(float)
    y = d["recovery_fraction"].to_numpy(float)
    z = d["delta_kl"].to_numpy(float) if "delta_kl" in d else None
    corr = {}
    for method in ("spearman", "pearson"):
        corr[method] = _correlation(x, y, None, method, alpha, n_boot, n_perm, rng)
    if z is not None and np.isfinite(z).all():
        for method in ("partial_pearson", "partial_spearman"):
            corr[method] = _correlation(x, y, z, method, alpha, n_boot, n_perm, rng)
            corr[method]["control"] = "delta_kl"
    out["correlations"] = corr

    try:
        ols = _ols(d, alpha)
    except Exception as err:  # noqa: BLE001 - the report must still render
        ols = {"error": f"{type(err).__name__}: {err}", "n": n}
    out["ols"] = ols

    gain_noise = d["gain_within_noise"] if "gain_within_noise" in d else pd.Series(False, index=d.index)
    ce = d[(d["recovery_fraction"] >= RECOVERED_MIN) & (d["delta_cka"] <= 0) & ~gain_noise.astype(bool)]
    out["counterexamples"] = [
        {"artifact": _label(r), "recovery_fraction": r["recovery_fraction"], "delta_cka": r["delta_cka"]}
        for _, r in ce.iterrows()
    ]
    if np.isfinite(x).any() and x.size:
        pos = x[x > 0]
        thr = float(np.median(pos)) if pos.size else math.inf
        cw = d[(d["delta_cka"] >= thr) & (d["recovery_fraction"].abs() < 0.1)]
        out["cka_without_recovery"] = [
            {"artifact": _label(r), "recovery_fraction": r["recovery_fraction"], "delta_cka": r["delta_cka"]}
            for _, r in cw.iterrows()
        ]

    out["verdict"], out["reasons"] = _verdict(out, alpha, min_effect, min_n_ci)
    out["summary"] = _summary(out)
    return jsonable(out)


def analyze_with_controls(table: pd.DataFrame, alpha: float = 0.05, **kwargs) -> dict:
    """`analyze` plus the paired control contrasts and the undamaged model's self-distillation."""
    out = analyze(table, alpha=alpha, **kwargs)
    out["contrasts"] = control_contrasts(table, alpha) if "P" in table else []
    out["undamaged_self_distillation"] = undamaged_self_distillation(table) if "P" in table else []
    return jsonable(out)


# Paired ablations on the same damaged model: (label, arm A, arm B, what a difference means). Arms are chosen
# by recovery method (and teacher); "damaged" is the damaged model itself (recovery none).
CONTRASTS = (
    ("kd vs alignment-blocked", "kd", "alignment-blocked",
     "kd better: recovery needs re-alignment; equal with blocked CKA low: it does not"),
    ("alignment-only vs damaged", "alignment-only", "damaged", "re-alignment alone recovers performance"),
    ("kd vs sft", "kd", "sft", "the teacher's signal beats external answers"),
    ("kd vs kd from a damaged teacher", "kd", "kd-damaged-teacher", "the undamaged teacher matters"),
    ("cka-kd vs kd", "cka-kd", "kd", "an explicit alignment term adds recovery"),
)


def _arm(group: pd.DataFrame, arm: str) -> pd.Series | None:
    # The configured run itself: neither a replicate (+seedN) nor a checkpoint (@stepK).
    final = group[[parse_recovery_name(r)[1:] == (None, None) for r in group["recovery"]]]
    teacher = final["teacher"].astype(str) if "teacher" in final else pd.Series("none", index=final.index)
    if arm == "damaged":
        rows = final[final["recovery"] == "none"]
    elif arm == "kd-damaged-teacher":
        rows = final[(final["recovery_method"] == "kd") & (teacher != "none")]
    else:
        rows = final[(final["recovery_method"] == arm) & (teacher == "none")]
    return rows.iloc[0] if len(rows) else None


def _holm(p_values: list[float]) -> list[float]:
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def control_contrasts(table: pd.DataFrame, alpha: float = 0.05) -> list[dict]:
    """Paired ablation contrasts of performance P (and CKA, KL) between arms on the same damaged model.

    z = (P_A - P_B) / sqrt(se_A^2 + se_B^2), two-sided normal p, Holm-corrected over all contrasts made. The arms
    are scored on the same benchmark items, whose positive correlation makes this variance conservative."""
    rows = []
    damaged = table[(table["degradation"] != "none") & (table.get("role") != "teacher")]
    for (model, degradation), group in damaged.groupby(["model", "degradation"], sort=False):
        for label, a_name, b_name, meaning in CONTRASTS:
            a, b = _arm(group, a_name), _arm(group, b_name)
            if a is None or b is None:
                continue
            diff = float(a["P"] - b["P"])
            se = float(np.sqrt(a["P_stderr"] ** 2 + b["P_stderr"] ** 2))
            p = float(2 * sps.norm.sf(abs(diff) / se)) if se > 0 and math.isfinite(se) else math.nan
            rows.append({"model": model, "degradation": degradation, "contrast": label, "meaning": meaning,
                         "a": f"{model}/{degradation}/{a['recovery']}", "b": f"{model}/{degradation}/{b['recovery']}",
                         "diff_P": diff, "se": se, "ci_low": diff - sps.norm.ppf(1 - alpha / 2) * se,
                         "ci_high": diff + sps.norm.ppf(1 - alpha / 2) * se, "p": p,
                         "diff_cka": float(a["cka_mean"] - b["cka_mean"]), "diff_kl": float(a["kl"] - b["kl"])})
    finite = [i for i, r in enumerate(rows) if math.isfinite(r["p"])]
    for i, adjusted in zip(finite, _holm([rows[i]["p"] for i in finite])):
        rows[i]["p_holm"] = adjusted
        rows[i]["significant"] = adjusted < alpha
    return rows


def undamaged_self_distillation(table: pd.DataFrame) -> list[dict]:
    """Self-distillation of the undamaged model (degradation none): should change nothing."""
    out = []
    for model, group in table.groupby("model", sort=False):
        teacher = group[(group["degradation"] == "none") & (group["recovery"] == "none")]
        arms = group[(group["degradation"] == "none") & (group["recovery"] != "none")]
        if teacher.empty:
            continue
        t = teacher.iloc[0]
        for _, r in arms.iterrows():
            out.append({"artifact": f"{model}/none/{r['recovery']}", "diff_P": float(r["P"] - t["P"]),
                        "se": float(np.sqrt(r["P_stderr"] ** 2 + t["P_stderr"] ** 2)),
                        "cka_mean": float(r["cka_mean"]), "kl": float(r["kl"])})
    return out


def _fmt(x, nd=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _verdict(out: dict, alpha: float, min_effect: float, min_n_ci: int) -> tuple[str, list[str]]:
    n = out["n"]
    sp = out["correlations"]["spearman"]
    rho, p, lo, hi = sp["estimate"], sp["p_perm"], sp["ci_low"], sp["ci_high"]
    ols = out["ols"] or {}
    reasons_ref: list[str] = []
    reasons: list[str] = []

    if out["counterexamples"]:
        names = ", ".join(c["artifact"] for c in out["counterexamples"])
        reasons_ref.append(
            f"{len(out['counterexamples'])} artifact(s) recovered (recovery fraction >= {RECOVERED_MIN}, gain "
            f"beyond noise) while CKA did not rise (delta_cka <= 0): {names}"
        )
    if hi is not None and hi < min_effect:
        if n >= min_n_ci:
            reasons_ref.append(
                f"Spearman rho CI [{_fmt(lo)}, {_fmt(hi)}] excludes correlations >= min_effect {min_effect}"
            )
        else:
            reasons.append(
                f"Spearman CI upper bound {_fmt(hi)} < {min_effect}, but n={n} < {min_n_ci} is too few to refute"
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

    if reasons_ref:
        extra = ["(the correlation criteria for 'supported' were met, but the falsification pattern takes "
                 "precedence)"] if corr_ok and ols_ok else []
        return "refuted", reasons_ref + extra + reasons
    if corr_ok and ols_ok:
        return "supported", reasons
    return "inconclusive", reasons


def _summary(out: dict) -> str:
    sp = out["correlations"]["spearman"]
    lvl = int(round(100 * sp["ci_level"]))
    core = (
        f"n = {out['n']} recovered artifacts; Spearman rho(delta CKA, recovery fraction) = {_fmt(sp['estimate'])} "
        f"({lvl}% bootstrap CI {_fmt(sp['ci_low'])} to {_fmt(sp['ci_high'])}, permutation p = "
        f"{_fmt(sp['p_perm'], 4)})."
    )
    v = out["verdict"]
    if v == "supported":
        return ("Supported: in these artifacts, recovery goes with CKA re-alignment beyond output matching; " + core +
                " This is an association across these artifacts, not proof of a causal mechanism.")
    if v == "refuted":
        return "Refuted: the data show the falsification pattern named by the paper. " + core
    return "Inconclusive: the data neither support nor refute the claim at the pre-set thresholds. " + core
