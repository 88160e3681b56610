"""Dose-response: along each training run measured at checkpoints, the trajectory from the damaged parent
(step 0) through the checkpoints to the final model, with within-run OLS slopes (realign.analysis.regression)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from realign.analysis.regression import slope
from realign.analysis.selection import artifact_label
from realign.analysis.settings import AnalysisSettings
from realign.identity import run_name
from realign.io import jsonable


def dose_response(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> list[dict]:
    """Trajectories of training runs measured at checkpoints (artifacts ``R@stepK``; ``R+seedN@stepK`` for a
    replicate, whose run is ``R+seedN``).

    One dict per run: artifact (model/degradation/run), model, degradation, recovery (the run's name),
    recovery_method, final_step, damage and damage_within_noise (of the damaged parent: if within noise, moves
    of P along the run are not beyond noise either), points, slopes, notes. ``points`` in step order: the
    damaged parent (kind 'damaged', step 0), the checkpoints (kind 'checkpoint'), the final model (kind
    'final', its ``step``); each with artifact, kind, step, step_fraction (step / final_step), P, P_stderr,
    cka_mean, kl. ``slopes`` {P_vs_cka, cka_vs_step, P_vs_step} (x = cka_mean or step_fraction): within-run OLS
    with n, slope, intercept and, from 3 points on, se, ci_low, ci_high, ci_level, p (t with n - 2 df; the
    points of one run are not independent draws, so read these as a description of the run, not a test), at
    level 1 - alpha of ``settings`` (realign.analysis.settings; ``overrides`` replace its fields).
    """
    alpha = AnalysisSettings.resolve(settings, **overrides).alpha
    if "checkpoint" not in table or not table["checkpoint"].astype(bool).any():
        return []
    key = {k: i for i, k in enumerate(table[["model", "degradation", "recovery"]].itertuples(index=False, name=None))}
    ck = table[table["checkpoint"].astype(bool)].copy()
    # The run a checkpoint belongs to: its recovery name without the @step suffix (keeps +seedN).
    ck["_run"] = [run_name(r) for r in ck["recovery"]]
    runs = []
    for (model, degradation, run), group in ck.groupby(["model", "degradation", "_run"], sort=True):
        notes = []
        parent_i, final_i = key.get((model, degradation, "none")), key.get((model, degradation, run))
        final = table.iloc[final_i] if final_i is not None else None
        final_step = float(final["step"]) if final is not None and np.isfinite(float(final["step"])) else math.nan
        if not math.isfinite(final_step):
            final_step = float(group["step"].max())
            notes.append("final model not in the table (or its step unknown): step fraction relative to the "
                         "last checkpoint")
        if parent_i is None:
            notes.append("damaged parent not in the table: no step-0 point")

        def point(r, kind, step):
            return {"artifact": artifact_label(r), "kind": kind, "step": step,
                    "step_fraction": step / final_step if final_step > 0 else math.nan,
                    "P": r["P"], "P_stderr": r.get("P_stderr", math.nan), "cka_mean": r["cka_mean"], "kl": r["kl"]}

        points = [point(table.iloc[parent_i], "damaged", 0.0)] if parent_i is not None else []
        points += [point(r, "checkpoint", float(r["step"])) for _, r in group.sort_values("step").iterrows()]
        if final is not None:
            points.append(point(final, "final", final_step))
        parent = table.iloc[parent_i] if parent_i is not None else None
        dmg_noise = bool(parent.get("damage_within_noise", False)) if parent is not None else None
        if dmg_noise:
            notes.append("damage within noise: moves of P along this run are not beyond noise")
        col = {k: np.array([pt[k] for pt in points], float) for k in ("P", "cka_mean", "step_fraction")}
        runs.append({
            "artifact": f"{model}/{degradation}/{run}", "model": model, "degradation": degradation, "recovery": run,
            "recovery_method": group["recovery_method"].iloc[0] if "recovery_method" in group else None,
            "final_step": final_step,
            "damage": parent.get("damage", math.nan) if parent is not None else math.nan,
            "damage_within_noise": dmg_noise,
            "points": points,
            "slopes": {"P_vs_cka": slope(col["cka_mean"], col["P"], alpha),
                       "cka_vs_step": slope(col["step_fraction"], col["cka_mean"], alpha),
                       "P_vs_step": slope(col["step_fraction"], col["P"], alpha)},
            "notes": notes,
        })
    return jsonable(runs)
