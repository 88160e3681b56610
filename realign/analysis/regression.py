"""Regression across artifacts and along runs: OLS with robust errors, the mixed model, within-run slopes.

* :func:`ols`: ``recovery_fraction ~ delta_cka + delta_kl [+ C(family)]`` with HC3 heteroscedasticity-robust
  standard errors and t-based p-values / CIs (``use_t=True``, conservative at small n). ``C(family)`` is added
  when there are >1 families, every family has >= 2 analysed rows and the residual degrees of freedom stay
  >= 2. Terms that make the design rank-deficient are dropped (family first, then delta_kl) and noted.
* :func:`mixed_model`: ``recovery_fraction ~ delta_cka + delta_kl`` with a random intercept per base ``model``
  (statsmodels MixedLM, REML, Wald z p-values / CIs), fitted when >= 2 base models have >= 2 analysed rows
  each, so a correlation driven by differences *between* base models shows up. Reported and named in the
  reasons; not a verdict criterion.
* :func:`runs_model`: the same association in the units the study has: runs (damaged parent x recovery x training
  seed) with their checkpoints as repeated measures, a random intercept per damaged parent and, within it, per
  run (a random slope of delta_cka per run when runs have checkpoints), so neither arms that share a damaged
  parent nor the checkpoints of one run count as independent artifacts. Description, not a verdict criterion.
* :func:`slope`: the OLS slope of one variable on another along a run (realign.analysis.dose_response).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats as sps

from realign.analysis.settings import AnalysisSettings


def ols(d: pd.DataFrame, settings: AnalysisSettings) -> dict:
    """The OLS of the module docstring on the analysed rows ``d`` (realign.analysis.selection), CIs at level
    1 - settings.alpha. Returns formula, cov_type, n, df_resid, r2, r2_adj, coefficients {name: {coef, se,
    ci_low, ci_high, p}}, includes_delta_kl, includes_family, notes; or {error, notes, n} when delta_cka alone
    makes the design rank-deficient."""
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
    ci = fit.conf_int(alpha=settings.alpha)
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


def mixed_model(d: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> dict:
    """``recovery_fraction ~ delta_cka + delta_kl`` with a random intercept per base ``model`` on the analysed
    rows ``d`` (from realign.analysis.selection.select_analysed). With several base models, a pooled
    correlation can come from differences between the models alone; the random intercept absorbs those. CIs at
    level 1 - alpha of ``settings`` (realign.analysis.settings; ``overrides`` replace its fields).

    Returns ``{"skipped": reason}`` unless >= 2 base models have >= 2 rows each (models with fewer rows are
    left out, noted); ``{"error": ..., ...}`` when the fit fails (singular designs do); otherwise formula,
    method ('REML'), n, n_groups, groups {model: rows}, coefficients {Intercept, delta_cka[, delta_kl]: {coef,
    se, ci_low, ci_high, p}} (Wald z), group_variance, residual_variance, converged, warnings, notes.
    """
    import statsmodels.formula.api as smf

    settings = AnalysisSettings.resolve(settings, **overrides)
    counts = d["model"].value_counts() if "model" in d and len(d) else pd.Series(dtype=int)
    usable = counts[counts >= 2]
    if len(usable) < 2:
        return {"skipped": f"needs >= 2 base models with >= 2 analysed rows each; have {len(usable)} "
                           f"(rows per model: {dict(counts)})"}
    notes = []
    if len(usable) < len(counts):
        notes.append(f"left out base models with < 2 analysed rows: {sorted(set(counts.index) - set(usable.index))}")
    d = d[d["model"].isin(usable.index)]
    base = {"formula": None, "method": "REML", "n": int(len(d)), "n_groups": int(len(usable)),
            "groups": {str(k): int(v) for k, v in usable.items()}, "notes": notes}
    if np.ptp(d["delta_cka"].to_numpy(float)) == 0:
        return {**base, "error": "design rank-deficient: delta_cka is constant"}
    use_kl = "delta_kl" in d and bool(np.isfinite(d["delta_kl"].to_numpy(float)).all())
    if use_kl:
        X = np.column_stack([np.ones(len(d)), d["delta_cka"].to_numpy(float), d["delta_kl"].to_numpy(float)])
        if np.linalg.matrix_rank(X) < 3:
            use_kl = False
            notes.append("delta_kl dropped: collinear with delta_cka or constant")
    else:
        notes.append("delta_kl left out: missing values")
    formula = base["formula"] = "recovery_fraction ~ delta_cka" + (" + delta_kl" if use_kl else "")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cols = ["recovery_fraction", "delta_cka"] + (["delta_kl"] if use_kl else [])
            data = d[cols].astype(float).assign(model=d["model"].astype(str).to_numpy())
            fit = smf.mixedlm(formula, data, groups=data["model"]).fit(reml=True)
        ci = fit.conf_int(alpha=settings.alpha)
        coefs = {}
        for name in fit.fe_params.index:
            coefs[name] = {"coef": float(fit.fe_params[name]), "se": float(fit.bse_fe[name]),
                           "ci_low": float(ci.loc[name, 0]), "ci_high": float(ci.loc[name, 1]),
                           "p": float(fit.pvalues[name])}
    except Exception as err:  # noqa: BLE001 - singular fits must not stop the report
        return {**base, "error": f"{type(err).__name__}: {err}"}
    return {**base, "coefficients": coefs, "group_variance": float(np.asarray(fit.cov_re)[0, 0]),
            "residual_variance": float(fit.scale), "converged": bool(fit.converged),
            # ConvergenceWarning (e.g. a group variance on the boundary 0) says how far to trust the fit.
            "warnings": list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))}


def _run_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The recovered artifacts (final runs and their checkpoints) of damaged parents beyond noise with finite
    recovery_fraction and delta_cka, with `parent` (model/degradation) and `run` (parent/recovery without @step)."""
    from realign.identity import run_name

    rows = table[(table["degradation"] != "none") & (table["recovery"] != "none")]
    if "damage_within_noise" in rows:
        rows = rows[~rows["damage_within_noise"].astype(bool)]
    rows = rows[np.isfinite(rows["recovery_fraction"].astype(float)) & np.isfinite(rows["delta_cka"].astype(float))]
    parent = rows["model"].astype(str) + "/" + rows["degradation"].astype(str)
    run = [run_name(r) for r in rows["recovery"]]
    return rows.assign(parent=parent.to_numpy(), run=(parent + "/" + pd.Series(run, index=rows.index)).to_numpy())


def runs_model(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> dict:
    """``recovery_fraction ~ delta_cka [+ delta_kl]`` over runs and their checkpoints (module docstring), REML
    (statsmodels MixedLM), Wald CIs at level 1 - alpha:

    * >= 2 damaged parents: groups = parent (random intercept), a variance component per run nested in it, and
      a per-run delta_cka slope component when some run has >= 2 rows (checkpoints);
    * one damaged parent whose runs have checkpoints: groups = run, random intercept and delta_cka slope;
    * otherwise ``{"skipped": reason}``: the rows are independent runs of one parent, which the OLS describes.

    Returns formula, structure (in words), n (rows), n_runs, n_parents, repeated (runs with checkpoints),
    coefficients {term: {coef, se, ci_low, ci_high, p}}, variance_components {parent, run, run_slope: variance},
    residual_variance, converged, warnings, notes; or {"error": ...} when the fit fails."""
    import statsmodels.formula.api as smf

    settings = AnalysisSettings.resolve(settings, **overrides)
    d = _run_rows(table) if len(table) else table
    n_parents, n_runs = (int(d["parent"].nunique()), int(d["run"].nunique())) if len(d) else (0, 0)
    repeated = int((d.groupby("run").size() >= 2).sum()) if len(d) else 0
    base = {"n": int(len(d)), "n_runs": n_runs, "n_parents": n_parents, "repeated": repeated, "notes": []}
    if n_parents < 2 and repeated == 0:
        return {**base, "skipped": f"{n_runs} run(s) of {n_parents} damaged parent(s), none measured at checkpoints: "
                                   "no grouping to model (the OLS describes independent runs)"}
    if len(d) < 4 or np.ptp(d["delta_cka"].to_numpy(float)) == 0:
        return {**base, "skipped": f"{len(d)} row(s), or delta_cka constant: too few to fit"}
    use_kl = "delta_kl" in d and bool(np.isfinite(d["delta_kl"].to_numpy(float)).all())
    if use_kl and np.linalg.matrix_rank(np.column_stack([np.ones(len(d)), d["delta_cka"], d["delta_kl"]]
                                                        ).astype(float)) < 3:
        use_kl = False
        base["notes"].append("delta_kl dropped: collinear with delta_cka or constant")
    formula = "recovery_fraction ~ delta_cka" + (" + delta_kl" if use_kl else "")
    cols = ["recovery_fraction", "delta_cka"] + (["delta_kl"] if use_kl else [])
    data = d[cols].astype(float).assign(parent=d["parent"].to_numpy(), run=d["run"].to_numpy())
    if n_parents >= 2:
        vc = {"run": "0 + C(run)"}
        if repeated:
            vc["run_slope"] = "0 + C(run):delta_cka"
        structure = ("random intercept per damaged parent; per run within it: intercept"
                     + (" and delta_cka slope" if repeated else ""))
        model = smf.mixedlm(formula, data, groups=data["parent"], re_formula="1", vc_formula=vc)
    else:
        structure = "one damaged parent: random intercept and delta_cka slope per run"
        model = smf.mixedlm(formula, data, groups=data["run"], re_formula="~delta_cka")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = model.fit(reml=True)
        ci = fit.conf_int(alpha=settings.alpha)
        coefs = {name: {"coef": float(fit.fe_params[name]), "se": float(fit.bse_fe[name]),
                        "ci_low": float(ci.loc[name, 0]), "ci_high": float(ci.loc[name, 1]),
                        "p": float(fit.pvalues[name])} for name in fit.fe_params.index}
    except Exception as err:  # noqa: BLE001 - singular fits must not stop the report
        return {**base, "formula": formula, "structure": structure, "error": f"{type(err).__name__}: {err}"}
    # Named for what they vary over: the random effects of the grouping factor, then the nested components.
    grouping = ("parent",) if n_parents >= 2 else ("run", "run_slope")
    components = dict(zip(grouping, (float(v) for v in np.diag(np.asarray(fit.cov_re)))))
    components.update(zip(model.exog_vc.names, (float(v) for v in np.atleast_1d(fit.vcomp))))
    return {**base, "formula": formula, "structure": structure, "method": "REML", "coefficients": coefs,
            "variance_components": components, "residual_variance": float(fit.scale),
            "converged": bool(fit.converged),
            "warnings": list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))}


def slope(x: np.ndarray, y: np.ndarray, alpha: float) -> dict:
    """OLS slope of y on x with its standard error, t-based CI and p (>= 3 points); 2 points: slope only."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        return {"n": n, "slope": None, "note": "fewer than 2 points with distinct x: no slope"}
    xc = x - x.mean()
    sxx = float(xc @ xc)
    beta = float(xc @ (y - y.mean())) / sxx
    out = {"n": n, "slope": beta, "intercept": float(y.mean() - beta * x.mean())}
    if n == 2:
        return {**out, "se": None, "ci_low": None, "ci_high": None, "p": None,
                "note": "2 points: slope only, no standard error"}
    resid = y - (out["intercept"] + beta * x)
    se = math.sqrt(float(resid @ resid) / (n - 2) / sxx)
    half = float(sps.t.ppf(1 - alpha / 2, n - 2)) * se
    if se > 0:
        p = float(2 * sps.t.sf(abs(beta) / se, n - 2))
    else:  # the points lie exactly on a line
        p = 0.0 if beta != 0 else None
    return {**out, "se": se, "ci_low": beta - half, "ci_high": beta + half, "p": p, "ci_level": 1 - alpha}
