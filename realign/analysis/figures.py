"""Figures for the report, returned as inline SVG strings (deterministic: fixed hash salt, no date)."""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from realign.analysis.selection import select_analysed  # noqa: E402
from realign.identity import is_configured_run  # noqa: E402

_RC = {
    "svg.hashsalt": "realign",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}
_COLORS = plt.get_cmap("tab10").colors


def _svg(fig) -> str:
    buf = io.StringIO()
    with plt.rc_context(_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    s = buf.getvalue()
    start = s.find("<svg")
    s = s[start:] if start >= 0 else s
    # let CSS size it: keep the viewBox, drop fixed width/height attributes of the root element
    head, rest = s.split(">", 1)
    head = re.sub(r'\s(width|height)="[^"]*"', "", head, count=2)
    return head + ' class="fig" role="img">' + rest


def _empty(msg: str) -> str:
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, msg, ha="center", va="center")
        return _svg(fig)


def _final_recoveries(recoveries) -> list[str]:
    """The configured runs: neither replicates (+seedN) nor checkpoints (@stepK), which would crowd a figure."""
    return [r for r in recoveries if is_configured_run(r)]


def cka_layer_curves(cka_layers: pd.DataFrame, metric: str = "debiased_cka",
                     null_floors: pd.DataFrame | None = None) -> dict[str, str]:
    """One SVG per (model, degradation): similarity to the teacher by layer, one line per recovery (configured
    runs only), the 95% bootstrap band over probe sequences where known, and the null floors of the model
    (teacher vs a random-init model, vs its own token-shuffled activations) as grey dotted lines.

    Keys are "model / degradation". The teacher is 1 at every layer (dashed line).
    """
    out: dict[str, str] = {}
    if cka_layers is None or cka_layers.empty:
        return out
    df = cka_layers[cka_layers["degradation"] != "none"]
    df = df[df["recovery"].isin(["none", *_final_recoveries(df["recovery"].unique())])]
    all_recs = sorted(r for r in df["recovery"].unique() if r != "none")
    for (m, d), g in df.groupby(["model", "degradation"], sort=True):
        with plt.rc_context(_RC):
            fig, ax = plt.subplots(figsize=(6.4, 3.4))
            layers = np.sort(g["layer"].unique())
            ax.axhline(1.0, color="black", lw=1, ls="--", label="teacher")
            recs = sorted(g["recovery"].unique(), key=lambda r: (r != "none", r))
            for r in recs:
                gg = g[g["recovery"] == r].sort_values("layer")
                label = "damaged (no recovery)" if r == "none" else r
                color = "grey" if r == "none" else _rec_color(r, all_recs)
                ax.plot(gg["layer"], gg[metric], marker="o", ms=2.5, label=label, color=color,
                        lw=2 if r == "none" else 1.3)
                low, high = f"{metric}_ci_low", f"{metric}_ci_high"
                if low in gg and np.isfinite(gg[low].astype(float)).any():
                    ax.fill_between(gg["layer"], gg[low].astype(float), gg[high].astype(float), color=color,
                                    alpha=0.15, lw=0)
            if null_floors is not None and not null_floors.empty and metric in null_floors:
                floors = null_floors[null_floors["model"] == m] if "model" in null_floors else null_floors
                full = floors[floors["n_samples"] == floors["n_samples"].max()]
                for (name, style) in (("random-init", ":"), ("token-shuffled", "-.")):
                    nf = full[full["null"] == name].sort_values("layer")
                    if len(nf):
                        ax.plot(nf["layer"], nf[metric], color="dimgrey", ls=style, lw=1, label=f"null: {name}")
            ax.set_xlabel("layer (0 = embeddings)")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{m} / {d}")
            if len(layers) <= 40:
                ax.set_xticks(layers[:: max(1, len(layers) // 12)])
            ax.legend(fontsize=6.5, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
            out[f"{m} / {d}"] = _svg(fig)
    return out


def cka_heatmaps(table: pd.DataFrame, matrices: dict, estimator: str = "debiased") -> dict[str, str]:
    """One SVG per (model, degradation): the teacher-layer x artifact-layer CKA matrix of the damaged model and
    of each configured recovery, on one colour scale. `matrices`: {(model, degradation, recovery): summary
    dict with "matrix": {estimator: [[...]]}}. A well-aligned artifact has its maximum on the diagonal."""
    out: dict[str, str] = {}
    damaged = table[table["degradation"] != "none"]
    for (m, d), g in damaged.groupby(["model", "degradation"], sort=True):
        names = ["none", *sorted(_final_recoveries(r for r in g["recovery"].unique() if r != "none"))]
        panels = [(r, np.asarray(matrices[(m, d, r)]["matrix"][estimator], float)) for r in names
                  if estimator in (matrices.get((m, d, r)) or {}).get("matrix", {})]
        if not panels:
            continue
        columns = min(4, len(panels))
        rows = math.ceil(len(panels) / columns)
        with plt.rc_context(_RC):
            fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns + 0.8, 2.5 * rows), squeeze=False)
            fig.subplots_adjust(wspace=0.5, hspace=0.6)
            image = None
            for ax, (r, matrix) in zip(axes.flat, panels):
                image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower", interpolation="nearest")
                ax.set_title("damaged" if r == "none" else r, fontsize=8)
                ax.set_xlabel("artifact layer", fontsize=7)
                ax.set_ylabel("teacher layer", fontsize=7)
                ax.tick_params(labelsize=6)
            for ax in list(axes.flat)[len(panels):]:
                ax.axis("off")
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"{estimator} CKA")
            fig.suptitle(f"{m} / {d}: layer x layer CKA vs the teacher", fontsize=9)
            out[f"{m} / {d}"] = _svg(fig)
    return out


def small_n_inflation(null_floors: pd.DataFrame) -> str:
    """Null CKA (mean over layers >= 1) against the number of probe tokens: the biased estimator reads well
    above 0 on unrelated representations at small n; the debiased one stays near 0."""
    if null_floors is None or null_floors.empty:
        return _empty("no null floors measured")
    body = null_floors[null_floors["layer"] >= 1]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for j, name in enumerate(sorted(body["null"].unique())):
            g = body[body["null"] == name].groupby("n_samples")[["linear_cka", "debiased_cka"]].mean()
            ax.plot(g.index, g["linear_cka"], marker="o", color=_COLORS[j], label=f"{name}: linear (biased)")
            ax.plot(g.index, g["debiased_cka"], marker="s", ls="--", color=_COLORS[j],
                    label=f"{name}: debiased")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("probe tokens n")
        ax.set_ylabel("CKA with the teacher (layer mean)")
        ax.set_title("null CKA vs sample size")
        ax.legend(fontsize=7, frameon=False)
        return _svg(fig)


def _floats(values) -> np.ndarray:
    """Values from the JSON-able statistics (None = missing) as a float array with NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], float)


def contrast_forest(contrasts: list[dict]) -> str:
    """Forest plot of the paired control contrasts: A - B in the performance measure with its CI; filled markers
    where the Holm-corrected p is below alpha."""
    if not contrasts:
        return _empty("no control contrasts in this study")
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(contrasts) + 1.1))
        ys = np.arange(len(contrasts))[::-1]
        for y, c in zip(ys, contrasts):
            diff, low, high = _floats(c.get(k) for k in ("diff_P", "ci_low", "ci_high"))
            ax.plot([low, high], [y, y], color="black", lw=1.2)
            ax.plot(diff, y, "o", color="black", mfc="black" if c.get("significant") else "white", ms=6)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{c['degradation']}: {c['contrast']}" for c in contrasts], fontsize=8)
        ax.set_xlabel("difference in P (A - B), 95% CI; filled: Holm p < alpha")
        ax.set_title("controls: paired contrasts")
        return _svg(fig)


def dose_response_trajectories(runs: list[dict]) -> str:
    """P and mean CKA along each training run measured at checkpoints (step 0 = the damaged model)."""
    runs = [r for r in runs or [] if len(r.get("points") or []) >= 2]
    if not runs:
        return _empty("no run was measured at checkpoints")
    with plt.rc_context(_RC):
        fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.2))
        for j, run in enumerate(runs):
            points = run["points"]
            fraction = [p["step_fraction"] for p in points]
            label = f"{run['degradation']} / {run['recovery']}"
            perf, stderr, cka = (_floats(p.get(k) for p in points) for k in ("P", "P_stderr", "cka_mean"))
            left.errorbar(_floats(fraction), perf, yerr=np.nan_to_num(2 * stderr), marker="o", ms=3, capsize=2,
                          color=_COLORS[j % 10], label=label)
            right.plot(_floats(fraction), cka, marker="o", ms=3, color=_COLORS[j % 10], label=label)
        left.set_xlabel("fraction of recovery steps")
        left.set_ylabel("P (error bars: 2 SE)")
        right.set_xlabel("fraction of recovery steps")
        right.set_ylabel("mean CKA vs the teacher")
        left.set_title("performance along recovery")
        right.set_title("alignment along recovery")
        right.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        return _svg(fig)


# Recovery colours: tab10 without its grey, which marks the damaged model and the damage bars.
_REC_COLORS = [c for i, c in enumerate(_COLORS) if i != 7] + list(plt.get_cmap("tab20b").colors)


def _rec_color(rec: str, all_recs: list[str]):
    """The same recovery gets the same colour in every figure."""
    return _REC_COLORS[all_recs.index(rec) % len(_REC_COLORS)] if rec in all_recs else "black"


def _simple_fit(x, y):
    A = np.column_stack([np.ones_like(x), x])
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    return beta


def cka_recovery_scatter(table: pd.DataFrame, stats: dict | None = None, n_boot: int = 500, seed: int = 0) -> str:
    """delta CKA vs recovery fraction for the analysed artifacts, coloured by family, with a least-squares line
    (recovery_fraction ~ delta_cka, the bivariate fit shown for display) and its 95% percentile-bootstrap band.
    Excluded candidates (damage within noise) are drawn as hollow grey points if their values are finite."""
    d, _ = select_analysed(table)
    cand = table[(table["degradation"] != "none") & (table["recovery"] != "none")]
    excl = cand.drop(index=d.index)
    excl = excl[np.isfinite(excl["delta_cka"].astype(float)) & np.isfinite(excl["recovery_fraction"].astype(float))]
    if d.empty and excl.empty:
        return _empty("no recovered artifacts to plot")
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(6, 4))
        fams = sorted(d["family"].unique()) if "family" in d else []
        for i, f in enumerate(fams):
            g = d[d["family"] == f]
            ax.scatter(g["delta_cka"], g["recovery_fraction"], s=28, color=_COLORS[i % 10], label=f, zorder=3)
        if not excl.empty:
            ax.scatter(excl["delta_cka"], excl["recovery_fraction"], s=28, facecolors="none",
                       edgecolors="grey", label="excluded (damage within noise)", zorder=2)
        x = d["delta_cka"].to_numpy(float)
        y = d["recovery_fraction"].to_numpy(float)
        if len(x) >= 3 and np.ptp(x) > 0:
            grid = np.linspace(x.min(), x.max(), 50)
            b = _simple_fit(x, y)
            rng = np.random.default_rng(seed)
            preds = []
            for _ in range(n_boot):
                idx = rng.integers(0, len(x), len(x))
                if np.ptp(x[idx]) == 0:
                    continue
                bb = _simple_fit(x[idx], y[idx])
                preds.append(bb[0] + bb[1] * grid)
            ax.plot(grid, b[0] + b[1] * grid, color="black", lw=1.5, label="least-squares fit")
            if len(preds) >= 10:
                lo, hi = np.percentile(np.array(preds), [2.5, 97.5], axis=0)
                ax.fill_between(grid, lo, hi, color="black", alpha=0.12, lw=0, label="95% bootstrap band")
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(1, color="grey", lw=0.6, ls=":")
        ax.axvline(0, color="grey", lw=0.6)
        estimator = str(d["cka_estimator"].iloc[0]) if "cka_estimator" in d and len(d) else "linear"
        ranges = d.reindex(columns=["alignment_first", "alignment_last"]).dropna()
        spans = {f"{int(a)}-{int(b)}" for a, b in ranges.itertuples(index=False)}
        layers = f"layers {spans.pop()}" if len(spans) == 1 else "pre-registered layers"
        ax.set_xlabel(f"delta CKA vs damaged parent (mean {estimator} CKA, {layers})")
        ax.set_ylabel("recovery fraction")
        title = "recovery vs re-alignment"
        sp = ((stats or {}).get("correlations") or {}).get("spearman")
        if sp and sp.get("estimate") is not None:
            title += f" (Spearman rho = {sp['estimate']:.2f}, n = {sp['n']})"
        ax.set_title(title)
        ax.legend(fontsize=7, frameon=False)
        return _svg(fig)


def damage_recovery_bars(table: pd.DataFrame) -> str:
    """Grouped bars per (model, degradation): the damage (teacher - damaged) and each recovery's gain
    (recovered - damaged), in units of the performance measure P (higher = better); 2-stderr error bars where
    a standard error is known."""
    rows = table[table["degradation"] != "none"]
    if rows.empty:
        return _empty("no degraded artifacts")
    groups = list(rows.groupby(["model", "degradation"], sort=True))
    recs = sorted(r for r in rows["recovery"].unique() if r != "none")
    series = ["damage"] + recs
    width = 0.8 / len(series)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(min(14, max(5, 1.2 * len(groups) * (1 + 0.3 * len(series)))), 3.6))
        xs = np.arange(len(groups))
        for j, s in enumerate(series):
            vals, errs = [], []
            for _, g in groups:
                if s == "damage":
                    r = g[g["recovery"] == "none"]
                    v = r["damage"].iloc[0] if len(r) else math.nan
                    e = r["damage_stderr"].iloc[0] if len(r) and "damage_stderr" in r else math.nan
                else:
                    r = g[g["recovery"] == s]
                    v = r["gain"].iloc[0] if len(r) else math.nan
                    parent = g[g["recovery"] == "none"]
                    e = math.nan
                    if len(r) and len(parent) and "P_stderr" in r:
                        e = math.hypot(float(r["P_stderr"].iloc[0]), float(parent["P_stderr"].iloc[0]))
                vals.append(float(v))
                errs.append(2 * float(e) if np.isfinite(e) else 0.0)
            color = "dimgrey" if s == "damage" else _rec_color(s, recs)
            ax.bar(xs + (j - (len(series) - 1) / 2) * width, vals, width, yerr=errs, color=color,
                   label=s if s == "damage" else f"gain: {s}", capsize=2, error_kw={"lw": 0.8})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{m}\n{d}" for (m, d), _ in groups], fontsize=8,
                           rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
        metric = str(table["performance_metric"].iloc[0]) if "performance_metric" in table else "P"
        ax.set_ylabel(f"change in P ({metric}; higher = better)")
        ax.set_title("damage and recovery (error bars: 2 standard errors)")
        # Beside the axes: with a dozen arms a legend inside covers the bars.
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        return _svg(fig)
