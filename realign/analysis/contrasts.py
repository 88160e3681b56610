"""Paired control contrasts: the ablations that carry the argument, compared on the same damaged model.

Each contrast is P_A - P_B between two arms recovered from the same damaged model, with the interval and p of
the paired item bootstrap (realign.analysis.resampling.paired_difference), Holm-corrected over all contrasts;
and the undamaged model's self-distillation, which should change nothing.
"""

from __future__ import annotations

import math

import pandas as pd

from realign.analysis.arms import KD_METHOD
from realign.analysis.resampling import holm, paired_difference
from realign.analysis.settings import AnalysisSettings
from realign.identity import is_configured_run

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
    final = group[[is_configured_run(r) for r in group["recovery"]]]
    teacher = final["teacher"].astype(str) if "teacher" in final else pd.Series("none", index=final.index)
    if arm == "damaged":
        rows = final[final["recovery"] == "none"]
    elif arm == "kd-damaged-teacher":
        rows = final[(final["recovery_method"] == KD_METHOD) & (teacher != "none")]
    else:
        rows = final[(final["recovery_method"] == arm) & (teacher == "none")]
    return rows.iloc[0] if len(rows) else None


def control_contrasts(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> list[dict]:
    """Paired ablation contrasts of performance P (and CKA, KL) between arms on the same damaged model.

    The interval and p-value of P_A - P_B come from the paired item bootstrap (both arms resampled on the same
    items, stratified by task: realign.analysis.performance); p-values are Holm-corrected over all contrasts
    and ``significant`` below settings.alpha (realign.analysis.settings; ``overrides`` replace its fields)."""
    alpha = AnalysisSettings.resolve(settings, **overrides).alpha
    rows = []
    damaged = table[(table["degradation"] != "none") & (table.get("role") != "teacher")]
    for (model, degradation), group in damaged.groupby(["model", "degradation"], sort=False):
        for label, a_name, b_name, meaning in CONTRASTS:
            a, b = _arm(group, a_name), _arm(group, b_name)
            if a is None or b is None:
                continue
            rows.append({"model": model, "degradation": degradation, "contrast": label, "meaning": meaning,
                         "a": f"{model}/{degradation}/{a['recovery']}", "b": f"{model}/{degradation}/{b['recovery']}",
                         **paired_difference(a, b, alpha),
                         "diff_cka": float(a["cka_mean"] - b["cka_mean"]), "diff_kl": float(a["kl"] - b["kl"])})
    finite = [i for i, r in enumerate(rows) if math.isfinite(r["p"])]
    for row in rows:  # no test without a positive, finite standard error (e.g. both arms at accuracy 0)
        row.update(p_holm=math.nan, significant=False, note=None if math.isfinite(row["p"]) else
                   f"no test: the paired standard error of A - B is {row['se']:g} (the arms agree on every item)")
    for i, adjusted in zip(finite, holm([rows[i]["p"] for i in finite])):
        rows[i]["p_holm"] = adjusted
        rows[i]["significant"] = adjusted < alpha
    return rows


def undamaged_self_distillation(table: pd.DataFrame, settings: AnalysisSettings | None = None,
                                **overrides) -> list[dict]:
    """Self-distillation of the undamaged model (degradation none): should change nothing. One row per arm:
    artifact, P_arm - P_teacher with its paired interval at level 1 - alpha, cka_mean, kl."""
    alpha = AnalysisSettings.resolve(settings, **overrides).alpha
    out = []
    for model, group in table.groupby("model", sort=False):
        teacher = group[(group["degradation"] == "none") & (group["recovery"] == "none")]
        arms = group[(group["degradation"] == "none") & (group["recovery"] != "none")]
        if teacher.empty:
            continue
        t = teacher.iloc[0]
        for _, r in arms.iterrows():
            out.append({"artifact": f"{model}/none/{r['recovery']}", **paired_difference(r, t, alpha),
                        "cka_mean": float(r["cka_mean"]), "kl": float(r["kl"])})
    return out
