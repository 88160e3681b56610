"""The pre-registered theta test in the statistics (realign.analysis.stats.analyze_with_controls, key `theta`) and
in the HTML report (realign.analysis.report.render_report), on constructed tables (tests/theta_tables.py)."""

import html as html_lib
import json

import numpy as np
import pandas as pd
import pytest

from realign.analysis.theta import analyze_theta
from realign.analysis.report import render_report
from realign.analysis.settings import AnalysisSettings
from realign.analysis.stats import analyze_with_controls
from realign.analysis.theta_view import TITLE
from theta_tables import build, study

HELD = {"held": "alignment-held"}
DAMAGES = ("q4", "prune", "forget")
LOW_CKA = {"kd": 0.06, "held": 0.0, "sft": 0.01}
KL = {"kd": 0.1, "held": 0.12, "sft": 0.4}
# Non-default thresholds: the report must state these, not the schema's defaults.
S = AnalysisSettings.defaults(n_boot=50, n_perm=50, theta_support=0.45, theta_refute=0.2, power_tables=20)


def _table(gains, seed=0, **kw) -> pd.DataFrame:
    """A theta_tables study with the columns the correlational analysis reads as well (a teacher above every
    parent: damage, gain and recovery fraction from P; delta KL from the parent's KL; a CKA mean)."""
    rng = np.random.default_rng(seed)
    t = build(study(rng, gains=gains, methods=HELD, degradations=DAMAGES, seed_sd=0.005, delta_cka=LOW_CKA, kl=KL,
                    **kw))
    parents = t[t["recovery"] == "none"].set_index("degradation")
    parent_p = t["degradation"].map(parents["P"])
    t["damage"] = parents["P"].max() + 0.3 - parent_p
    t["gain"] = t["P"] - parent_p
    t["recovery_fraction"] = np.where(t["recovery"] == "none", np.nan, t["gain"] / t["damage"])
    t["delta_kl"] = t["kl"] - t["degradation"].map(parents["kl"])
    t["cka_mean"] = 0.6 + t["delta_cka"]  # the control contrasts read it
    t["damage_ci_low"] = t["damage"] - 0.1  # every damage beyond noise
    t["family"] = t["degradation"].map({"q4": "quantization", "prune": "pruning", "forget": "forgetting"})
    t["changed_fraction"] = np.where(t["recovery"] == "none", np.nan, 0.5)  # kd's record: it moved the weights
    return t


PREREGISTERED = {"code": {"commit": "c0ffee", "clean": True,
                          "preregistration": {"page": "p.md", "commit": "c0ffee", "changed_since": []}}}


def _render(table, stats, path, provenance=None) -> str:
    cka = pd.DataFrame(columns=["model", "degradation", "recovery", "layer", "linear_cka", "debiased_cka"])
    render_report(table, stats, cka, PREREGISTERED if provenance is None else provenance, path)
    return path.read_text()


def _theta_section(page: str) -> str:
    start = page.index('<section id="theta"')
    return html_lib.unescape(page[start:page.index("</section>", start)])


@pytest.mark.parametrize("gains, outcome", [({"kd": 0.2, "held": 0.02}, "supported"),
                                            ({"kd": 0.2, "held": 0.2}, "refuted")])
def test_the_statistics_carry_analyze_theta_s_verdict_and_interval(gains, outcome):
    table = _table(gains)
    expected = analyze_theta(table, S)
    assert expected.verdict.outcome == outcome, expected.verdict.reason  # the tables do what they are built for
    entry = analyze_with_controls(table, S)["theta"]
    assert entry["estimated"] is True
    assert (entry["outcome"], entry["reason"]) == (expected.verdict.outcome, expected.verdict.reason)
    assert [v["outcome"] for v in entry["verdicts"]] == [v.outcome for v in expected.verdict.damages]
    assert [(d["damage"], d["theta"], d["low"], d["high"], d["seeds"]) for d in entry["damages"]] == [
        (d.damage, d.theta, d.low, d.high, list(d.seeds)) for d in expected.theta.damages]
    assert [c["passed"] for c in entry["checks"]] == [c.passed for c in expected.checks]
    assert [e["eligible"] for e in entry["eligibility"]] == [e.eligible for e in expected.eligibility]
    assert entry["thresholds"]["theta_support"] == 0.45 and entry["thresholds"]["theta_refute"] == 0.2
    json.dumps(entry, allow_nan=False)  # plain JSON: no NaN, no numpy


def test_without_a_held_arm_theta_is_not_estimated_and_says_why():
    entry = analyze_with_controls(_table({"kd": 0.2, "sft": 0.05}), S)["theta"]
    assert entry["estimated"] is False and entry["reason"] == "no alignment-held arm in the study"
    assert "alignment-held" in entry["how_to_estimate"] and entry["thresholds"]["theta_refute"] == 0.2


def test_a_held_arm_without_kd_on_its_parent_is_named():
    table = _table({"kd": 0.2, "held": 0.02})
    table = table[~((table["degradation"] == "q4") & table["recovery"].str.startswith("kd"))]
    entry = analyze_with_controls(table, S)["theta"]
    assert entry["estimated"] is True  # the two other parents still estimate theta
    assert [d["damage"] for d in entry["damages"]] == ["m/prune", "m/forget"]
    assert any("no kd arm" in n and "m/q4" in n for n in entry["notes"])
    only_q4 = table[table["degradation"] == "q4"]
    entry = analyze_with_controls(only_q4, S)["theta"]
    assert entry["estimated"] is False and "no kd arm" in entry["reason"] and "m/q4" in entry["reason"]


def test_a_table_the_theta_analysis_refuses_gives_its_reason():
    # two held arms on each parent: the table cannot say which dose enters theta (arms.pick raises ValueError)
    rng = np.random.default_rng(0)
    table = build(study(rng, gains={"kd": 0.2, "held": 0.02, "held-half": 0.1},
                        methods={"held": "alignment-held", "held-half": "alignment-held"}))
    from realign.analysis.theta_summary import theta_entry
    entry = theta_entry(table, S)
    assert entry["estimated"] is False and "several alignment-held arms" in entry["reason"]
    assert "held, held-half" in entry["reason"]


def test_the_report_states_the_rules_then_the_verdict_and_theta(tmp_path):
    table = _table({"kd": 0.2, "held": 0.02})
    stats = analyze_with_controls(table, S)
    section = _theta_section(_render(table, stats, tmp_path / "r.html"))
    entry = stats["theta"]
    assert section.count(TITLE) == 1
    for text in ("θ_support = 0.45", "θ_refute = 0.2", "cka_rise_min = 0.5", "meaningful_recovery = 0.25",
                 "held_cka_margin = 0.25", "kl_margin = 0.2", "α / 2 = 0.025"):
        assert text in section, text
    # the rules come before the verdict
    assert section.index("θ_support = 0.45") < section.index("Pre-registered verdict")
    assert '<span class="word">supported</span>' in section and entry["reason"] in section
    for d in entry["damages"]:
        assert d["damage"] in section and f"[{d['low']:.3f}, {d['high']:.3f}]" in section
    for v in entry["verdicts"]:
        assert all(r in section for r in v["reasons"])
    for c in entry["checks"]:
        for p in c["parts"]:
            assert p["statement"] in section
    # the study's own simulated power at its design, per damage, and its validation
    power = entry["power"]
    assert power["design"]["n_seeds"] == 2 and power["damages"] == [d["damage"] for d in entry["damages"]]
    assert "Simulated power of this study" in section and "Validation" in section
    # the correlational verdict stays, labelled as a description
    html = _render(table, stats, tmp_path / "r2.html")
    assert "Association across arms (description)" in html
    # the report leads with the answer: the pre-registered test before the description
    assert html.index('<section id="theta"') < html.index('<section id="association"')
    # a config that names no pre-registration page: the same rules, called what they are
    exploratory = _theta_section(_render(table, stats, tmp_path / "r3.html", provenance={}))
    assert "Pre-registered verdict" not in exploratory and "fixed before the results" not in exploratory
    assert "Verdict by these rules (exploratory)" in exploratory and "Rules (as configured; not pre-registered)" \
        in exploratory and '<span class="word">supported</span>' in exploratory


def test_the_report_says_why_theta_is_not_estimated(tmp_path):
    table = _table({"kd": 0.2, "sft": 0.05})
    section = _theta_section(_render(table, analyze_with_controls(table, S), tmp_path / "r.html"))
    assert TITLE in section and "θ_refute = 0.2" in section
    assert "θ not estimated:</strong> no alignment-held arm in the study." in section
    assert "alignment-held" in section and "paired by seed" in section
    assert "Pre-registered verdict" not in section


def test_statistics_without_a_theta_entry_still_render(tmp_path):
    table = _table({"kd": 0.2, "sft": 0.05})
    stats = analyze_with_controls(table, S)
    del stats["theta"]
    section = _theta_section(_render(table, stats, tmp_path / "r.html"))
    assert "carry no theta entry" in section and "Rules (fixed" not in section


def test_the_report_prices_the_power_grid_at_this_study_s_own_job_times(tmp_path):
    """The statistics price the grid at JobCosts' defaults (the same table, the same statistics); the report
    re-prices it at the mean job times of its own run (provenance timings), here dear similarity jobs, and names
    that design and its hours. Without run times it says nothing of them."""
    table = _table({"kd": 0.2, "held": 0.02})
    stats = analyze_with_controls(table, S)
    row = {"items": 1, "refute_power": [0.9] * 3, "support_power": [0.9] * 3, "check_power": [0.9] * 3}
    stats["theta"]["power"].update(grid=[{**row, "n_seeds": 4, "probes": 4}, {**row, "n_seeds": 8, "probes": 1}],
                                   budget={**row, "n_seeds": 4, "probes": 4, "job_seconds": 1.0},
                                   h1prime_power=0.5, require_check=False)
    timings = {"recover": {"n": 4, "seconds": 400.0}, "evaluate": {"n": 5, "seconds": 500.0},
               "divergence": {"n": 5, "seconds": 100.0}, "activations": {"n": 5, "seconds": 450.0},
               "similarity": {"n": 5, "seconds": 1500.0}}
    cka = pd.DataFrame(columns=["model", "degradation", "recovery", "layer", "linear_cka", "debiased_cka"])
    render_report(table, stats, cka, {"timings": timings}, tmp_path / "r.html")
    section = " ".join(_theta_section((tmp_path / "r.html").read_text()).split())  # the template's line breaks
    hours = 3 * 3 * 8 * (100 + 20 + 100 + 90 + 300) / 3600  # 8 seeds at x1: 4 seeds at x4 costs 3 * 3 * 4 * 6460 s
    assert "at the default job times" in section and "4 seeds per arm" in section
    assert "At this study's own mean job times (per run: training 100 s, divergence 20 s, evaluation 100 s" in section
    assert f"8 seeds per arm, 1× the items, 1× the probe sequences, about {hours:.1f} h of job time" in section
    assert "own mean job times" not in _theta_section(_render(table, stats, tmp_path / "r2.html"))
