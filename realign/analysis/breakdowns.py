"""Breakdowns of the pooled association: does it hold on every benchmark task, and with every similarity measure?

* :func:`per_benchmark`: damage / gain / recovery fraction on each lm-eval task separately, with the noise rule
  of :mod:`realign.analysis.table`, and a per-task Spearman where >= ``min_n`` artifacts have damage beyond
  noise on that task. Descriptive: shows whether one task carries the pooled result.
* :func:`by_measure`: the Spearman of the recovery fraction with the change of each similarity measure.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from realign.analysis.resampling import correlation
from realign.analysis.selection import artifact_label, select_analysed
from realign.analysis.settings import AnalysisSettings
from realign.analysis.table import NLL_NOISE_NATS, _within_noise
from realign.io import jsonable
from realign.measure.similarity import measures_primary_first

# Each similarity measure's layer mean, from realign.analysis.table; the first family is CKA, the second is not.
MEASURE_LABELS = {m.name: m.label for m in measures_primary_first()}


def by_measure(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> list[dict]:
    """Spearman of recovery fraction with the change of each similarity measure vs the damaged parent, over the
    analysed artifacts: does the association hold whichever measure of geometry is used (Davari et al. 2023
    show CKA alone can be steered)? Measures missing from the table are left out; fewer than settings.min_n
    artifacts with the measure: skipped. Each measure's resampling starts from settings.seed."""
    settings = AnalysisSettings.resolve(settings, **overrides)
    d, _ = select_analysed(table)
    out = []
    for measure, label in MEASURE_LABELS.items():
        column = f"delta_{measure}"
        if column not in d:
            continue
        rows = d[np.isfinite(d[column].astype(float))]
        entry = {"measure": measure, "label": label, "n": len(rows)}
        if len(rows) < settings.min_n:
            out.append({**entry, "skipped": f"n = {len(rows)} < {settings.min_n}"})
            continue
        rng = np.random.default_rng(settings.seed)
        entry.update(correlation(rows[column].to_numpy(float), rows["recovery_fraction"].to_numpy(float), None,
                                 "spearman", settings, rng))
        entry["mean_delta"] = float(rows[column].mean())
        out.append(entry)
    return out


def _benchmark_tasks(table: pd.DataFrame) -> list[str]:
    names: set[str] = set()
    for joined in table["tasks"].dropna() if "tasks" in table else []:
        names.update(t for t in str(joined).split(",") if t)
    return sorted(t for t in names if f"acc_{t}" in table)


def per_benchmark(table: pd.DataFrame, settings: AnalysisSettings | None = None, **overrides) -> dict:
    """Damage and recovery on each benchmark task separately (accuracy, higher = better), for every recovered
    artifact of a damaged model (checkpoints excluded: they belong to realign.analysis.dose_response).

    Returns ``{"rows": [...], "spearman": [...]}``. One row per (artifact, task): artifact, model, degradation,
    recovery, recovery_method, task, acc, acc_stderr, damage (teacher - parent), damage_stderr,
    damage_within_noise, gain (artifact - parent), gain_within_noise, recovery_fraction (gain / damage; None
    where damage is 0), delta_cka, delta_kl (whole-model measures, repeated on each task's row). The noise flags
    use the rule of :mod:`realign.analysis.table`. One ``spearman`` entry per task: task, n (rows with damage
    beyond noise on the task and finite recovery fraction and delta_cka) and, where n >= settings.min_n, the
    Spearman of delta_cka with recovery fraction (estimate, ci_low, ci_high, ci_level, p_perm, n_boot_valid) as
    in realign.analysis.stats.analyze; otherwise ``skipped``. ``overrides`` replace fields of ``settings``.
    """
    settings = AnalysisSettings.resolve(settings, **overrides)
    min_n = settings.min_n
    tasks = _benchmark_tasks(table)
    if not tasks:
        return {"rows": [], "spearman": []}
    key = {k: i for i, k in enumerate(table[["model", "degradation", "recovery"]].itertuples(index=False, name=None))}
    checkpoint = table["checkpoint"].astype(bool) if "checkpoint" in table else pd.Series(False, index=table.index)
    recovered = (table["degradation"] != "none") & (table["recovery"] != "none") & ~checkpoint
    # Positions of each recovered artifact, its teacher and its damaged parent (build_table checked they exist).
    pos, t_pos, p_pos = [], [], []
    for i in np.flatnonzero(recovered.to_numpy()):
        m, dg = table["model"].iloc[i], table["degradation"].iloc[i]
        if (m, "none", "none") in key and (m, dg, "none") in key:
            pos.append(i)
            t_pos.append(key[(m, "none", "none")])
            p_pos.append(key[(m, dg, "none")])
    pos, t_pos, p_pos = np.array(pos, int), np.array(t_pos, int), np.array(p_pos, int)
    arts = table.iloc[pos]

    rows, spearman = [], []
    rng = np.random.default_rng(settings.seed)
    nan = np.full(len(table), np.nan)
    for task in tasks:
        acc = table[f"acc_{task}"].to_numpy(float)
        se = table[f"acc_{task}_stderr"].to_numpy(float) if f"acc_{task}_stderr" in table else nan
        damage, gain = acc[t_pos] - acc[p_pos], acc[pos] - acc[p_pos]
        dmg_noise = _within_noise(damage, se[t_pos], se[p_pos], "stderr", NLL_NOISE_NATS)
        gain_noise = _within_noise(gain, se[pos], se[p_pos], "stderr", NLL_NOISE_NATS)
        with np.errstate(divide="ignore", invalid="ignore"):
            rf = np.where(damage != 0, gain / damage, np.nan)
        for j, (_, r) in enumerate(arts.iterrows()):
            rows.append({"artifact": artifact_label(r), "model": r["model"], "degradation": r["degradation"],
                         "recovery": r["recovery"], "recovery_method": r.get("recovery_method"), "task": task,
                         "acc": acc[pos[j]], "acc_stderr": se[pos[j]], "damage": damage[j],
                         "damage_stderr": math.sqrt(se[t_pos[j]] ** 2 + se[p_pos[j]] ** 2),
                         "damage_within_noise": bool(dmg_noise[j]), "gain": gain[j],
                         "gain_within_noise": bool(gain_noise[j]), "recovery_fraction": rf[j],
                         "delta_cka": r.get("delta_cka", math.nan), "delta_kl": r.get("delta_kl", math.nan)})
        # Same selection as the pooled analysis, with this task's damage in place of the primary measure's.
        x = arts["delta_cka"].to_numpy(float) if "delta_cka" in arts else np.full(len(arts), np.nan)
        ok = ~dmg_noise & np.isfinite(rf) & np.isfinite(x)
        n = int(ok.sum())
        if n >= min_n:
            spearman.append({"task": task, **correlation(x[ok], rf[ok], None, "spearman", settings, rng)})
        else:
            spearman.append({"task": task, "n": n, "skipped": f"n={n} artifacts with damage beyond noise on "
                                                              f"{task} and a defined recovery fraction and "
                                                              f"delta_cka (need >= {min_n})"})
    return jsonable({"rows": rows, "spearman": spearman})
