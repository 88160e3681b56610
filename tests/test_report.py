"""realign.analysis.report / figures: self-contained HTML with verdict, figures, numbers and relative links."""

import re

import numpy as np
import pandas as pd

from realign.analysis import figures
from realign.analysis.report import fmt_num, render_report
from realign.analysis.stats import analyze
from realign.analysis.table import build_table


def _study(root):
    rng = np.random.default_rng(0)
    rows, cka_rows = [], []

    def add(deg, rec, bench, cka, kl, family):
        base = root / "results"
        rows.append({
            "model": "tiny", "degradation": deg, "recovery": rec, "family": family,
            "degradation_method": "none" if deg == "none" else "rtn", "recovery_method": "none" if rec == "none" else rec,
            "tasks": "arc", "acc_arc": bench, "acc_arc_stderr": 0.005, "bench_mean": bench,
            "bench_mean_stderr": 0.005, "nll_general": 3 - bench, "nll_code": 2.0, "cka_mean": cka, "cka_min": cka - 0.1,
            "kl": kl, "top1": 1 - kl, "seconds": 10.0,
            "path_artifact": str(base / "models/tiny" / deg / rec / "artifact.json"),
            "path_eval": str(base / "eval/tiny" / deg / f"{rec}.json"),
            "path_divergence": str(base / "divergence/tiny" / deg / f"{rec}.json"),
            "path_cka": str(base / "cka/tiny" / deg / f"{rec}.parquet"),
        })
        for layer in range(5):
            c = 1.0 if deg == "none" else max(0.0, cka - 0.05 * layer + 0.1)
            cka_rows.append({"model": "tiny", "degradation": deg, "recovery": rec, "layer": layer,
                             "linear_cka": c, "debiased_cka": c - 0.01})

    add("none", "none", 0.60, 1.0, 0.0, "teacher")
    for i in range(6):
        fam = "quantization" if i % 2 else "pruning"
        add(f"d{i}", "none", 0.40, 0.6, 0.5, fam)
        for rec in ("kd", "sdft"):
            x = rng.uniform(0.02, 0.3)
            add(f"d{i}", rec, 0.40 + 0.2 * min(1.0, 0.1 + 3 * x + rng.normal(0, 0.03)), 0.6 + x, rng.uniform(0.1, 0.5), fam)
    return build_table(rows, "bench_mean"), pd.DataFrame(cka_rows)


def test_render_report(tmp_path):
    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=200, n_perm=200)
    out = tmp_path / "results" / "report.html"
    prov = {"config": {"models": {"tiny": {"source": "random"}}, "analysis": {"alpha": 0.05}},
            "config_hash": "abc123", "versions": {"torch": "2.5"}, "hardware": {"cpu": "2 cores"},
            "timings": {"degrade": [1.0, 2.0], "recover": {"n": 2, "seconds": 30.0}, "measure": 5},
            "data_splits": {"probe": "wikitext test[:64]"}}
    render_report(table, stats, cka, prov, out)
    html = out.read_text()
    assert stats["verdict"] in html
    assert "<svg" in html
    assert not re.search(r'(src|href)\s*=\s*"https?://', html)
    assert "<script" not in html
    for col in ("recovery_fraction", "delta_cka", "damage", "kl"):
        for v in table[col].dropna():
            assert fmt_num(v) in html
    assert 'href="models/tiny/d0/kd/artifact.json"' in html
    assert "abc123" in html and "wikitext test[:64]" in html and "recover" in html
    assert not list(out.parent.glob(".report.html.*"))  # no temporary left


def test_report_with_too_few_artifacts_and_escaping(tmp_path):
    table, cka = _study(tmp_path)
    table = table[table.degradation.isin(["none", "d0"])].reset_index(drop=True)
    stats = analyze(table, n_boot=50, n_perm=50)
    assert stats["verdict"] == "inconclusive"
    render_report(table, stats, cka.iloc[0:0], {"title": "<b>x</b>"}, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "inconclusive" in html and "too few artifacts" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_figures_deterministic(tmp_path):
    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=50, n_perm=50)
    a = figures.cka_recovery_scatter(table, stats)
    assert a == figures.cka_recovery_scatter(table, stats)
    assert a.startswith("<svg")
    curves = figures.cka_layer_curves(cka)
    assert set(curves) == {f"tiny / d{i}" for i in range(6)}
    assert figures.damage_recovery_bars(table) == figures.damage_recovery_bars(table)
