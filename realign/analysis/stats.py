"""Does recovery go with re-alignment of hidden-layer geometry?  The analysis the report shows, in one call.

:func:`analyze_with_controls` is the report's single entry point; :func:`analyze` computes the association and
the verdict. Both take the settings of realign.analysis.settings (``settings=None, **overrides``). The analysed
set is that of :mod:`realign.analysis.selection`.

Statistics, each in its module
------------------------------
* Spearman (primary) and Pearson correlation of ``delta_cka`` with ``recovery_fraction``, with percentile
  bootstrap CIs and permutation p-values (:mod:`realign.analysis.resampling`).
* Partial correlations (Pearson and Spearman) of ``delta_cka`` with ``recovery_fraction`` controlling for
  ``delta_kl`` (does geometry go with recovery beyond output matching?), same bootstrap / permutation scheme
  (permutation of ``recovery_fraction``; reported, not used by the verdict).
* OLS ``recovery_fraction ~ delta_cka + delta_kl [+ C(family)]`` (HC3) and the mixed model with a random
  intercept per base model, and the runs model: runs as units, checkpoints as repeated measures, a random effect
  per damaged parent (:mod:`realign.analysis.regression`).
* The association outcome and its reasons (:mod:`realign.analysis.association`, whose docstring states the
  rules; stats.json key `association`; the pre-registered verdict is under `theta`).
* Paired control contrasts and the undamaged model's self-distillation (:mod:`realign.analysis.contrasts`).
* Per benchmark task and per similarity measure (:mod:`realign.analysis.breakdowns`).
* Dose-response along runs measured at checkpoints (:mod:`realign.analysis.dose_response`).
* Calibration of the verdict by simulation (:mod:`realign.analysis.calibration`).
* The pre-registered test of theta = 1 - gain(held) / gain(kd) and its verdict
  (:mod:`realign.analysis.theta`, presented by :mod:`realign.analysis.theta_summary`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from realign.analysis.breakdowns import by_measure, per_benchmark
from realign.analysis.contrasts import control_contrasts, undamaged_self_distillation
from realign.analysis.dose_response import dose_response
from realign.analysis.regression import mixed_model, ols, runs_model
from realign.analysis.resampling import correlation
from realign.analysis.selection import select_analysed
from realign.analysis.settings import AnalysisSettings
from realign.analysis.theta_summary import theta_entry
from realign.analysis.association import RECOVERED_MIN, cka_without_recovery, counterexamples, decide, summary
from realign.io import jsonable


def analyze(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> dict:
    """Correlations, partial correlations, OLS, the mixed model and the verdict (rules in
    realign.analysis.association), with ``settings`` (the schema's defaults when None; ``overrides`` replace fields).

    Returns a JSON-serialisable dict with keys: n, n_candidates, excluded, settings, performance_metric,
    correlations {spearman, pearson, partial_pearson, partial_spearman}, ols, mixed_model (see
    realign.analysis.regression.mixed_model), counterexamples, cka_without_recovery, verdict, reasons, summary.
    """
    settings = AnalysisSettings.resolve(settings, **overrides)
    min_n = settings.min_n
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
            "alpha": settings.alpha, "min_effect": settings.min_effect, "n_boot": settings.n_boot,
            "n_perm": settings.n_perm, "seed": settings.seed, "min_n": min_n, "min_n_ci": settings.min_n_ci,
            "recovered_min": RECOVERED_MIN, "primary": "spearman",
        },
        "performance_metric": perf,
        "correlations": {},
        "ols": None,
        "mixed_model": {"skipped": f"too few artifacts: n={n} analysed (need >= {min_n})"},
        "counterexamples": [],
        "cka_without_recovery": [],
    }
    if n < min_n:
        out["association"] = "inconclusive"
        out["reasons"] = [
            f"too few artifacts: n={n} analysed (need >= {min_n}); no statistics computed",
            "the paper's falsification criteria ('performance recovers while CKA stays low', 'CKA rises "
            "without performance') were not evaluated",
        ]
        out["summary"] = (
            f"Inconclusive: only {n} recovered artifact(s) with damage beyond noise; "
            "the data cannot say whether recovery goes with CKA re-alignment."
        )
        return jsonable(out)

    rng = np.random.default_rng(settings.seed)
    x = d["delta_cka"].to_numpy(float)
    y = d["recovery_fraction"].to_numpy(float)
    z = d["delta_kl"].to_numpy(float) if "delta_kl" in d else None
    corr = {}
    for method in ("spearman", "pearson"):
        corr[method] = correlation(x, y, None, method, settings, rng)
    if z is not None and np.isfinite(z).all():
        for method in ("partial_pearson", "partial_spearman"):
            corr[method] = correlation(x, y, z, method, settings, rng)
            corr[method]["control"] = "delta_kl"
    out["correlations"] = corr

    try:
        fit = ols(d, settings)
    except Exception as err:  # noqa: BLE001 - the report must still render
        fit = {"error": f"{type(err).__name__}: {err}", "n": n}
    out["ols"] = fit
    out["mixed_model"] = mixed_model(d, settings)
    out["counterexamples"] = counterexamples(d)
    out["cka_without_recovery"] = cka_without_recovery(d)

    out["association"], out["reasons"] = decide(out, settings)
    out["summary"] = summary(out)
    return jsonable(out)


def analyze_with_controls(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> dict:
    """The single entry point of the report: `analyze` (with the verdict and the mixed model) plus the paired
    control contrasts, the undamaged model's self-distillation, the per-benchmark breakdown, the dose-response
    trajectories, the breakdown by similarity measure and the pre-registered theta analysis (keys contrasts,
    undamaged_self_distillation, per_benchmark, dose_response, by_measure, runs_model (realign.analysis.regression),
    theta: see
    realign.analysis.theta_summary.theta_entry), all with the same ``settings`` (``overrides`` replace fields)."""
    settings = AnalysisSettings.resolve(settings, **overrides)
    out = analyze(table, settings)
    has_p = "P" in table
    out["contrasts"] = control_contrasts(table, settings) if has_p else []
    out["undamaged_self_distillation"] = undamaged_self_distillation(table, settings) if has_p else []
    out["per_benchmark"] = per_benchmark(table, settings)
    out["dose_response"] = dose_response(table, settings) if has_p else []
    out["by_measure"] = by_measure(table, settings)
    out["runs_model"] = runs_model(table, settings)
    out["theta"] = theta_entry(table, settings)
    return jsonable(out)
