"""realign.analysis.report / figures: self-contained HTML with verdict, figures, numbers and relative links."""

import re

import numpy as np
import pandas as pd

from realign.analysis import figures
from realign.analysis.report import fmt_num, render_report
from realign.analysis.stats import analyze
from realign.analysis.table import build_table
from item_records import records_for


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
            "kl": kl, "top1": 1 - kl, "seconds": 10.0, "alignment_first": 1, "alignment_last": 3,
            "cka_embedding": 0.987 if deg == "none" else 0.912, "cka_final": 1.0 if deg == "none" else 0.543,
            "path_artifact": str(base / "models/tiny" / deg / rec / "artifact.json"),
            "path_eval": str(base / "eval/tiny" / deg / f"{rec}.json"),
            "path_divergence": str(base / "divergence/tiny" / deg / f"{rec}.json"),
            "path_similarity": str(base / "cka/tiny" / deg / f"{rec}.parquet"),
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
    return build_table(rows, "bench_mean", records_for(rows)), pd.DataFrame(cka_rows)


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
    assert stats["association"] in html
    assert "<svg" in html
    assert not re.search(r'(src|href)\s*=\s*"https?://', html)
    assert "<script" not in html
    for col in ("recovery_fraction", "delta_cka", "damage", "kl"):
        for v in table[col].dropna():
            assert fmt_num(v) in html
    assert 'href="models/tiny/d0/kd/artifact.json"' in html
    kd = table[(table.degradation == "d0") & (table.recovery == "kd")].iloc[0]  # gain and fraction with intervals
    assert (f"{fmt_num(kd['recovery_fraction'])} [{fmt_num(kd['recovery_fraction_ci_low'])}, "
            f"{fmt_num(kd['recovery_fraction_ci_high'])}]") in html
    assert f"{fmt_num(kd['secondary_gain'])} [{fmt_num(kd['secondary_gain_ci_low'])}," in html
    # the pre-registered range is stated; the embeddings' and the final state's CKA are shown apart
    assert html.count("hidden states 1–3") >= 2 and "CKA embeddings" in html and "CKA final state" in html
    assert "0.912" in html and "0.543" in html
    assert "abc123" in html and "wikitext test[:64]" in html and "recover" in html
    assert not list(out.parent.glob(".report.html.*"))  # no temporary left


def test_report_with_too_few_artifacts_and_escaping(tmp_path):
    table, cka = _study(tmp_path)
    table = table[table.degradation.isin(["none", "d0"])].reset_index(drop=True)
    stats = analyze(table, n_boot=50, n_perm=50)
    assert stats["association"] == "inconclusive"
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


def test_report_shows_measures_nulls_heatmaps_controls_and_trajectories(tmp_path):
    from realign.analysis.stats import analyze_with_controls

    table, cka = _study(tmp_path)
    table["cka_estimator"] = "debiased"
    for measure, shift in (("procrustes_sim", 0.1), ("knn_overlap", -0.3)):
        table[f"{measure}_mean"] = table["cka_mean"] + shift
        table[f"delta_{measure}"] = table["delta_cka"]
    stats = analyze_with_controls(table, n_boot=100, n_perm=100)
    assert [m["measure"] for m in stats["by_measure"]] == ["procrustes_sim", "knn_overlap"]
    floors = pd.DataFrame([{"model": "tiny", "null": null, "n_samples": n, "layer": layer,
                            "linear_cka": 0.5 * 16 / n, "debiased_cka": 0.001, "procrustes_sim": 0.3}
                           for null in ("random-init", "token-shuffled") for n in (16, 64, 256) for layer in range(5)])
    matrices = {("tiny", f"d{i}", r): {"matrix": {"debiased": np.eye(5).tolist()}}
                for i in range(6) for r in ("none", "kd", "sdft")}
    stats["dose_response"] = [{"artifact": "tiny/d0/kd", "degradation": "d0", "recovery": "kd", "points": [
        {"step_fraction": f, "P": 0.4 + 0.1 * f, "P_stderr": 0.01, "cka_mean": 0.6 + 0.2 * f} for f in (0, 0.5, 1)],
        "slopes": {"P_vs_cka": {"slope": 0.5, "ci_low": 0.1, "ci_high": 0.9}, "cka_vs_step": {"slope": 0.2},
                   "P_vs_step": {"slope": 0.1}}}]
    stats["contrasts"] = [{"degradation": "d0", "contrast": "kd vs sft", "diff_P": 0.02, "ci_low": -0.01,
                           "ci_high": 0.05, "p_holm": 0.2, "significant": False, "diff_cka": 0.1, "diff_kl": -0.1,
                           "meaning": "m"}]
    out = tmp_path / "results" / "report.html"
    render_report(table, stats, cka, {}, out, null_floors=floors, matrices=matrices)
    html = out.read_text()
    for anchor in ("heatmaps", "nulls", "measures", "controls", "dose", "benchmarks"):
        assert f'id="{anchor}"' in html
    section = html[html.index('id="heatmaps"'):html.index('id="nulls"')]
    assert section.count("<svg") == 6  # one heatmap grid per damaged model
    nulls = html[html.index('id="nulls"'):html.index('id="measures"')]
    assert "random-init" in nulls and "token-shuffled" in nulls and "<svg" in nulls
    assert "orthogonal Procrustes similarity" in html and "mutual k-NN overlap" in html
    # the legend of the measures table is the registry: one row per measure, its family, interval and paper
    from realign.measure.similarity import MEASURES

    legend = html[html.index('id="measure-legend"'):]
    legend = legend[:legend.index("</table>")]
    assert legend.count("<tr>") == len(MEASURES) + 1
    assert all(m.label in legend and m.reference in legend for m in MEASURES)
    assert legend.count("&#10003;") == sum(m.manipulation_check for m in MEASURES) == 3
    controls = html[html.index('id="controls"'):html.index('id="dose"')]
    assert "<svg" in controls and "kd vs sft" in controls
    assert "<svg" in html[html.index('id="dose"'):html.index('id="benchmarks"')]
    assert "mean debiased CKA" in html


def test_report_renders_a_contrast_with_zero_standard_error(tmp_path):
    """Two arms at accuracy 0 on a task (stderr 0): no test is possible; the report says so instead of crashing."""
    from realign.analysis.stats import analyze_with_controls

    table, cka = _study(tmp_path)
    table["teacher"] = "none"
    extra = table[(table.degradation == "d0") & (table.recovery == "kd")].assign(recovery="sft", recovery_method="sft")
    table = pd.concat([table, extra], ignore_index=True)
    arms = (table.degradation == "d0") & table.recovery.isin(["kd", "sft"])
    table.loc[arms, ["P", "P_stderr"]] = 0.0
    stats = analyze_with_controls(table, n_boot=50, n_perm=50)
    (zero,) = [c for c in stats["contrasts"] if c["degradation"] == "d0"]
    assert zero["p_holm"] is None and zero["significant"] is False and "standard error" in zero["note"]
    out = tmp_path / "report.html"
    render_report(table, stats, cka, {}, out)
    controls = out.read_text()
    controls = controls[controls.index('id="controls"'):controls.index('id="dose"')]
    assert "kd vs sft" in controls and "n/a" in controls and "standard error" in controls


def test_the_report_warns_when_artifacts_were_computed_on_different_cpu_kernels(tmp_path):
    """Issue 32: the same config and bytes gave two different forgetting parents on an AVX2 and an AVX-512 host;
    a study resumed on another kind of host mixes them, and the report says so before the verdict."""
    from realign.analysis.report import value_counts

    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=50, n_perm=50)
    table["cpu_capability"] = "AVX2"
    render_report(table, stats, cka, {}, tmp_path / "one.html")
    one = (tmp_path / "one.html").read_text()
    assert "computed on different CPU kernels" not in one and f"AVX2 {len(table)}" in one
    table.loc[table.index[:5], "cpu_capability"] = "AVX512"
    assert value_counts(table, "cpu_capability") == [{"value": "AVX2", "n": len(table) - 5},
                                                     {"value": "AVX512", "n": 5}]
    render_report(table, stats, cka, {}, tmp_path / "mixed.html")
    mixed = (tmp_path / "mixed.html").read_text()
    warning = mixed.index("Artifacts computed on different CPU kernels")
    assert warning < mixed.index('<section id="association"') and f"AVX2 ({len(table) - 5}), AVX512 (5)" in mixed


def test_the_report_warns_when_artifacts_were_measured_in_different_precisions(tmp_path):
    """measure.dtype: a study whose artifacts were measured partly in bf16 and partly in fp32 pairs numbers that
    differ by the precision; the report says so before the verdict, and lists the precisions in its provenance."""
    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=50, n_perm=50)
    table["measure_precision"] = "float32"
    render_report(table, stats, cka, {}, tmp_path / "one.html")
    one = (tmp_path / "one.html").read_text()
    assert "measured in different precisions" not in one and f"float32 {len(table)}" in one
    table.loc[table.index[:3], "measure_precision"] = "bfloat16"
    render_report(table, stats, cka, {}, tmp_path / "mixed.html")
    mixed = (tmp_path / "mixed.html").read_text()
    warning = mixed.index("Artifacts measured in different precisions")
    assert warning < mixed.index('<section id="association"') and f"float32 ({len(table) - 3}), bfloat16 (3)" in mixed


def test_the_report_prints_the_code_commit_and_the_preregistration_commit(tmp_path):
    """Issue 30: the report of a confirmatory study prints the commit of its pre-registration page and the code's
    commit, says when the checkout had uncommitted changes, and when the code is not at or after the page."""
    import subprocess

    from realign.analysis.provenance import code_state

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "code")
    before = git("rev-parse", "HEAD")
    (repo / "prereg.md").write_text("rules\n")
    git("add", "prereg.md")
    git("commit", "-q", "-m", "pre-registration")
    page_commit = git("rev-parse", "HEAD")
    (repo / "code.py").write_text("x = 2\n")
    git("commit", "-q", "-am", "later code")
    head = git("rev-parse", "HEAD")

    state = code_state(repo, "prereg.md")
    assert state == {"commit": head, "clean": True,
                     "preregistration": {"page": "prereg.md", "commit": page_commit, "changed_since": ["code.py"]}}
    (repo / "code.py").write_text("x = 3\n")
    assert code_state(repo)["clean"] is False and "preregistration" not in code_state(repo)
    git("checkout", "-q", "--", "code.py")
    git("checkout", "-q", page_commit)  # a clean clone of the pre-registration commit
    at_prereg = code_state(repo, "prereg.md")
    assert at_prereg["commit"] == page_commit and at_prereg["preregistration"]["changed_since"] == []
    assert code_state(tmp_path / "not-a-repo") == {"commit": None, "clean": None}
    assert before != page_commit

    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=50, n_perm=50)
    render_report(table, stats, cka, {"code": state}, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    prereg = html.index("Pre-registered</strong> in <code>prereg.md</code>")
    assert prereg < html.index('<section id="association"')
    assert page_commit in html and head in html and "uncommitted" not in html[prereg:prereg + 600]
    assert "1 file(s) changed since the pre-registration</strong>: <code>code.py</code>" in html
    render_report(table, stats, cka, {"code": at_prereg}, tmp_path / "at.html")
    assert ": the pre-registered code." in (tmp_path / "at.html").read_text()


def test_the_report_prints_the_configs_label_first_and_says_when_nothing_was_preregistered(tmp_path):
    """Issue 30: a quick demonstration is labelled as such in its report, above the verdict; a study whose config
    names no pre-registration page is called exploratory, and one that names it is not."""
    table, cka = _study(tmp_path)
    stats = analyze(table, n_boot=50, n_perm=50)
    label = "A QUICK DEMONSTRATION, not evidence"
    render_report(table, stats, cka, {"label": label, "code": {"commit": "abc123", "clean": True}},
                  tmp_path / "demo.html")
    html = (tmp_path / "demo.html").read_text()
    assert html.index(label) < html.index('<section id="theta"')
    assert "Not pre-registered:</strong>" in html and "Code: commit <code>abc123</code>" in html
    prereg = {"commit": "abc123", "clean": True,
              "preregistration": {"page": "p.md", "commit": "abc123", "changed_since": []}}
    render_report(table, stats, cka, {"code": prereg}, tmp_path / "confirmatory.html")
    confirmatory = (tmp_path / "confirmatory.html").read_text()
    assert "Not pre-registered" not in confirmatory and "study-label" not in confirmatory.split("</style>")[1]
