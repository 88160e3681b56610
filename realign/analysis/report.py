"""Self-contained HTML report: the association across arms (a description) and the pre-registered theta test first,
then setup, table, figures, statistics, provenance.

No external URLs, no JavaScript; figures are inline SVG; the CSS is inlined from report/report.css.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jinja2
import pandas as pd

from realign.analysis import figures
from realign.analysis.theta_view import theta_view
from realign.io import atomic_path, jsonable
from realign.measure.similarity import measures_primary_first

# the template and its style ship with the package (realign/assets links to report/)
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "assets"
TEMPLATE_NAME = "report.html.j2"
CSS_NAME = "report.css"

PATH_COLS = {"artifact": "path_artifact", "eval": "path_eval", "divergence": "path_divergence",
             "similarity": "path_similarity"}


def fmt_num(x, digits: int = 3) -> str:
    """How numbers are printed in the report: fixed `digits` decimals, '—' for missing values."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "—"
    if abs(v) >= 1000:
        return f"{v:.1f}"
    if v != 0 and abs(v) < 10 ** (-digits):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _to_yaml(obj) -> str:
    try:
        import yaml

        return yaml.safe_dump(jsonable(obj), sort_keys=False, default_flow_style=False, allow_unicode=True)
    except ImportError:  # pragma: no cover
        return json.dumps(jsonable(obj), indent=2, sort_keys=False)


def _rel(path, base: Path) -> str | None:
    if path is None or (isinstance(path, float) and math.isnan(path)) or str(path) == "":
        return None
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # different drive (Windows)
        return Path(path).as_posix()


def value_counts(table: pd.DataFrame, column: str) -> list[dict]:
    """How many artifacts have each value of `column` (`cpu_capability`: the CPU kernels their weights were
    computed with; `measure_precision`: the precision they were measured in), most first."""
    if column not in table or not len(table):
        return []
    return [{"value": str(name), "n": int(n)} for name, n in table[column].value_counts().items()]


def _timing_rows(timings) -> list[dict]:
    """provenance['timings']: {kind: seconds | [seconds, ...] | {"n": int, "seconds": float, ...}}."""
    rows = []
    for kind, v in (timings or {}).items():
        if isinstance(v, dict):
            total = v.get("seconds", v.get("total_seconds"))
            n = v.get("n", v.get("count"))
        elif isinstance(v, (list, tuple)):
            vals = [float(t) for t in v if t is not None]
            total, n = sum(vals), len(vals)
        else:
            total, n = v, None
        mean = (float(total) / n) if (total is not None and n) else None
        rows.append({"kind": kind, "n": n, "seconds": total, "mean": mean})
    return rows


def _setup(table: pd.DataFrame, provenance: dict) -> dict:
    config = provenance.get("config") or {}
    degs, recs = [], []
    for d, g in table[table["degradation"] != "none"].groupby("degradation", sort=True):
        degs.append({
            "name": d,
            "family": ", ".join(sorted(g["family"].astype(str).unique())),
            "method": ", ".join(sorted(g["degradation_method"].astype(str).unique()))
            if "degradation_method" in g else "",
            "params": _to_yaml((config.get("degradations") or {}).get(d)) if (config.get("degradations") or {}).get(d) else "",
        })
    for r, g in table[table["recovery"] != "none"].groupby("recovery", sort=True):
        recs.append({
            "name": r,
            "method": ", ".join(sorted(g["recovery_method"].astype(str).unique())) if "recovery_method" in g else "",
            "params": _to_yaml((config.get("recoveries") or {}).get(r)) if (config.get("recoveries") or {}).get(r) else "",
        })
    models = []
    for m in sorted(table["model"].unique()):
        spec = (config.get("models") or {}).get(m)
        models.append({"name": m, "spec": _to_yaml(spec) if spec else ""})
    splits = provenance.get("data_splits") or config.get("data")
    return {
        "models": models,
        "degradations": degs,
        "recoveries": recs,
        "data_splits": _to_yaml(splits) if splits else "",
        "performance": str(table["performance_metric"].iloc[0]) if "performance_metric" in table else "",
    }


ROW_COLS = [
    ("P", "P"), ("damage", "damage"), ("gain", "gain"), ("recovery_fraction", "recovery fraction"),
    ("cka_mean", "CKA mean"), ("cka_min", "CKA min"), ("delta_cka", "Δ CKA"), ("cka_embedding", "CKA embeddings"),
    ("cka_final", "CKA final state"), ("kl", "KL(T‖A)"),
    ("delta_kl", "Δ KL"), ("reverse_kl", "KL(A‖T)"), ("js", "JS"), ("top1", "top-1 agr."), ("bench_mean", "bench mean"), ("nll_general", "NLL general"),
    ("nll_code", "NLL code"), ("nll_math", "NLL math"), ("seconds", "time (s)"),
]


def _table_rows(table: pd.DataFrame, base: Path) -> list[dict]:
    out = []
    for _, r in table.iterrows():
        cells = [fmt_num(r.get(c)) if c in r else "—" for c, _ in ROW_COLS]
        links = []
        for label, col in PATH_COLS.items():
            rel = _rel(r.get(col), base) if col in r else None
            if rel:
                links.append({"label": label, "href": rel})
        role = r.get("role", "")
        noise = ""
        if role != "teacher" and bool(r.get("damage_within_noise", False)):
            noise = "damage within noise"
        elif role == "recovered" and bool(r.get("gain_within_noise", False)):
            noise = "gain within noise"
        out.append({
            "artifact": f"{r['model']} / {r['degradation']} / {r['recovery']}",
            "role": role,
            "family": r.get("family", ""),
            "method": r.get("recovery_method") if role == "recovered" else r.get("degradation_method", ""),
            "cells": cells,
            "noise": noise,
            "links": links,
        })
    return out


def _interval(r, column: str) -> str:
    low, high = r.get(f"{column}_ci_low"), r.get(f"{column}_ci_high")
    if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return f"{fmt_num(r.get(column))}"
    return f"{fmt_num(r.get(column))} [{fmt_num(low)}, {fmt_num(high)}]"


def _recovery_rows(table: pd.DataFrame) -> list[dict]:
    """Per damaged or recovered artifact: damage, gain and recovery fraction with their paired item-bootstrap
    intervals, on the primary measure and on accuracy, and whether the two disagree in sign."""
    out = []
    for _, r in table[table["role"] != "teacher"].iterrows() if "role" in table else []:
        recovered = r["role"] == "recovered"
        out.append({
            "artifact": f"{r['model']} / {r['degradation']} / {r['recovery']}", "role": r["role"],
            "damage": _interval(r, "damage"), "gain": _interval(r, "gain") if recovered else "",
            "fraction": _interval(r, "recovery_fraction") if recovered else "",
            "acc_damage": _interval(r, "secondary_damage") if "secondary_damage" in r else "—",
            "acc_gain": _interval(r, "secondary_gain") if recovered and "secondary_gain" in r else "",
            "acc_fraction": _interval(r, "secondary_recovery_fraction")
            if recovered and "secondary_recovery_fraction" in r else "",
            "disagree": bool(r.get("sign_disagrees", False)),
        })
    return out


def _corr_rows(stats: dict) -> list[dict]:
    names = {
        "spearman": "Spearman ρ (primary)",
        "pearson": "Pearson r",
        "partial_pearson": "partial Pearson r | Δ KL",
        "partial_spearman": "partial Spearman ρ | Δ KL",
    }
    rows = []
    for k, c in (stats.get("correlations") or {}).items():
        rows.append({
            "name": names.get(k, k),
            "estimate": fmt_num(c.get("estimate")),
            "ci": f"[{fmt_num(c.get('ci_low'))}, {fmt_num(c.get('ci_high'))}]",
            "level": fmt_num(100 * c["ci_level"], 0) + "%" if c.get("ci_level") else "",
            "p": fmt_num(c.get("p_perm"), 4),
            "n": c.get("n"),
        })
    return rows


def _ols_view(stats: dict) -> dict | None:
    ols = stats.get("ols")
    if not ols:
        return None
    if "error" in ols:
        return {"error": ols["error"], "notes": ols.get("notes", [])}
    coefs = [
        {"term": t, "coef": fmt_num(c["coef"]), "se": fmt_num(c["se"]),
         "ci": f"[{fmt_num(c['ci_low'])}, {fmt_num(c['ci_high'])}]", "p": fmt_num(c["p"], 4)}
        for t, c in ols["coefficients"].items()
    ]
    return {"error": None, "formula": ols["formula"], "cov_type": ols["cov_type"], "n": ols["n"], "r2": fmt_num(ols["r2"]),
            "r2_adj": fmt_num(ols["r2_adj"]), "coefs": coefs, "notes": ols.get("notes", [])}


MEASURE_COLS = [(f"{m.name}_mean", m.short) for m in measures_primary_first()]
INTERVALS = {"bootstrap": "bootstrap over probe sequences",
             "jackknife": "delete-a-group jackknife over probe sequences", "none": "none"}


def _measure_legend() -> list[dict]:
    """What each column of the measures table is, read from the registry (realign.measure.similarity.MEASURES)."""
    return [{"short": m.short, "label": m.label, "family": m.family, "reference": m.reference,
             "interval": INTERVALS[m.interval], "checked": m.manipulation_check} for m in measures_primary_first()]


def _measure_rows(table: pd.DataFrame, base: Path) -> list[dict]:
    """Every similarity measure's layer mean per artifact, and the debiased CKA's bootstrap CI."""
    rows = []
    for _, r in table.iterrows():
        rows.append({"artifact": f"{r['model']} / {r['degradation']} / {r['recovery']}",
                     "href": _rel(r.get("path_similarity_summary") or r.get("path_similarity"), base),
                     "cells": [fmt_num(r.get(c)) for c, _ in MEASURE_COLS],
                     "ci": f"[{fmt_num(r.get('cka_mean_ci_low'))}, {fmt_num(r.get('cka_mean_ci_high'))}]",
                     "delta": fmt_num(r.get("delta_cka")),
                     "delta_ci": f"[{fmt_num(r.get('delta_cka_ci_low'))}, {fmt_num(r.get('delta_cka_ci_high'))}]"})
    return rows


def _alignment_ranges(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """{model: (first, last)}: the pre-registered hidden states the alignment summary averages (the table's
    alignment_first/last, from measure.alignment_layers); empty for a table without them."""
    if not {"alignment_first", "alignment_last"} <= set(table) or table.empty:
        return {}
    pairs = table.groupby("model")[["alignment_first", "alignment_last"]].first()
    return {str(m): (int(r.alignment_first), int(r.alignment_last)) for m, r in pairs.iterrows()}


def _range_text(ranges: dict[str, tuple[int, int]]) -> str:
    if not ranges:
        return "the pre-registered hidden states (measure.alignment_layers)"
    def span(a: int, b: int) -> str:
        return f"{a}–{b}" if a < b else str(a)

    spans = {span(a, b) for a, b in ranges.values()}
    if len(spans) == 1:
        return f"hidden states {spans.pop()}"
    return "hidden states " + ", ".join(f"{span(a, b)} ({m})" for m, (a, b) in sorted(ranges.items()))


def _floor_rows(null_floors: pd.DataFrame | None, ranges: dict[str, tuple[int, int]]) -> list[dict]:
    """The null floors at the full probe size, as layer means over each model's alignment range (layers >= 1 for
    a model without one) per model and null."""
    if null_floors is None or null_floors.empty:
        return []
    rows = []
    for (model, name), g in null_floors.groupby(["model", "null"], sort=True):
        first, last = ranges.get(str(model), (1, int(g["layer"].max())))
        g = g[g["layer"].between(first, last)]
        g = g[g["n_samples"] == g["n_samples"].max()]
        rows.append({"model": model, "null": name, "n": int(g["n_samples"].iloc[0]),
                     "cells": [fmt_num(g[measure].mean()) if measure in g else "—"
                               for measure in (c.removesuffix("_mean") for c, _ in MEASURE_COLS)]})
    return rows


def figure_files(ctx: dict) -> dict[str, str]:
    """Every figure of a report context as a standalone SVG file: {"{section}-{slug}.svg" or "{section}.svg": svg}.

    A figure is a context value that is an inline SVG string, or a dict of them (the section is the context key
    without "_figs", the slug the dict key); width and height are put back from the viewBox so that an SVG viewer
    (or Snakemake's report) shows it at its natural size."""
    out: dict[str, str] = {}

    def add(name: str, svg: str) -> None:
        stem, i = name, 1
        while f"{stem}.svg" in out:
            i += 1
            stem = f"{name}-{i}"
        box = re.search(r'viewBox="[\d.]+ [\d.]+ ([\d.]+) ([\d.]+)"', svg[: svg.find(">")])
        if box:
            svg = svg.replace("<svg", f'<svg width="{box[1]}pt" height="{box[2]}pt"', 1)
        out[f"{stem}.svg"] = '<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + svg

    for key, value in ctx.items():
        section = key.removesuffix("_figs").replace("-", "_")
        if isinstance(value, str) and value.startswith("<svg"):
            add(section, value)
        elif isinstance(value, dict) and value and all(isinstance(v, str) and v.startswith("<svg") for v in value.values()):
            for name, svg in sorted(value.items()):
                add(f"{section}-{re.sub(r'[^A-Za-z0-9_.]+', '-', str(name)).strip('-.') or 'figure'}", svg)
    return out


def render_report(
    table: pd.DataFrame,
    stats: dict,
    similarity_layers: pd.DataFrame,
    provenance: dict,
    out_path,
    *,
    template_dir: str | os.PathLike | None = None,
    null_floors: pd.DataFrame | None = None,
    matrices: dict | None = None,
    figures_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Render the HTML report to `out_path` (atomically); return its figures as {file name: standalone SVG}
    (see `figure_files`), also written to `figures_dir` when given (for Snakemake's `report()`).

    provenance (all keys optional): title, label (the config's: printed above everything), code
    (realign.analysis.provenance.code_state), config (dict), config_hash (str), versions (dict), timings
    ({rule kind: seconds | [seconds] | {"n", "seconds"}}), hardware (dict or str), data_splits (dict).
    Artifact file links are relative to the report's directory. null_floors: the long tables of
    realign.measure.stage.null_floors with a `model` column; matrices: {(model, degradation, recovery): CKA
    summary dict of realign.measure.stage.similarity_to_teacher} for the layer x layer heatmaps.
    """
    out_path = Path(out_path)
    tdir = Path(template_dir) if template_dir else TEMPLATE_DIR
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(tdir)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_num
    css_file = tdir / CSS_NAME
    css = css_file.read_text() if css_file.exists() else ""

    provenance = provenance or {}
    stats = stats or {}
    hardware = provenance.get("hardware")
    estimator = str(table["cka_estimator"].iloc[0]) if "cka_estimator" in table and len(table) else "linear"
    ctx = {
        "title": provenance.get("title", "realign: does recovery go with re-alignment?"),
        "label": provenance.get("label"),
        "code": provenance.get("code") or {},
        "css": css,
        "association": stats.get("association", "inconclusive"),
        "summary": stats.get("summary", ""),
        "reasons": stats.get("reasons", []),
        "theta": theta_view(stats.get("theta"), {row["kind"]: row["mean"]
                                                 for row in _timing_rows(provenance.get("timings"))}),
        "n": stats.get("n"),
        "n_candidates": stats.get("n_candidates"),
        "settings": stats.get("settings", {}),
        "excluded": stats.get("excluded", []),
        "counterexamples": stats.get("counterexamples", []),
        "cka_without_recovery": stats.get("cka_without_recovery", []),
        "contrasts": stats.get("contrasts", []),
        "undamaged": stats.get("undamaged_self_distillation", []),
        "setup": _setup(table, provenance),
        "columns": [label for _, label in ROW_COLS],
        "rows": _table_rows(table, out_path.parent),
        "recovery_rows": _recovery_rows(table),
        "secondary": str(table["secondary_metric"].iloc[0]) if "secondary_metric" in table and len(table) else "",
        "estimator": estimator,
        "cka_figs": figures.cka_layer_curves(similarity_layers, f"{estimator}_cka", null_floors),
        "heatmaps": figures.cka_heatmaps(table, matrices or {}, estimator),
        "inflation": figures.small_n_inflation(null_floors) if null_floors is not None else None,
        "floors": _floor_rows(null_floors, _alignment_ranges(table)),
        "alignment_range": _range_text(_alignment_ranges(table)),
        "forest": figures.contrast_forest(stats.get("contrasts") or []),
        "trajectories": figures.dose_response_trajectories(stats.get("dose_response") or []),
        "dose_response": stats.get("dose_response") or [],
        "by_measure": stats.get("by_measure") or [],
        "measure_rows": _measure_rows(table, out_path.parent),
        "measure_columns": [label for _, label in MEASURE_COLS],
        "measure_legend": _measure_legend(),
        "per_benchmark": stats.get("per_benchmark") or {},
        "mixed": stats.get("mixed_model") or {},
        "runs_model": stats.get("runs_model") or {},
        "scatter": figures.cka_recovery_scatter(table, stats),
        "bars": figures.damage_recovery_bars(table),
        "corr": _corr_rows(stats),
        "ols": _ols_view(stats),
        "versions": _to_yaml(provenance.get("versions")) if provenance.get("versions") else "",
        "config": _to_yaml(provenance.get("config")) if provenance.get("config") else "",
        "config_hash": provenance.get("config_hash", ""),
        "timings": _timing_rows(provenance.get("timings")),
        "kernels": value_counts(table, "cpu_capability"),
        "precisions": value_counts(table, "measure_precision"),
        "hardware": (_to_yaml(hardware) if isinstance(hardware, (dict, list)) else str(hardware)) if hardware else "",
        "stats_json": json.dumps(jsonable(stats), indent=2, sort_keys=True),
    }
    html = env.get_template(TEMPLATE_NAME).render(**ctx)
    with atomic_path(out_path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    figs = figure_files(ctx)
    if figures_dir is not None:
        for name, svg in figs.items():
            with atomic_path(Path(figures_dir) / name) as tmp:
                tmp.write_text(svg, encoding="utf-8")
    return figs
