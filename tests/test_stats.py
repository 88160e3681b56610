"""realign.analysis.stats: planted vs null correlations, determinism, small n, JSON output, refutation."""

import json

import numpy as np
import pytest
import pandas as pd

from realign.analysis.stats import analyze

FAST = dict(n_boot=300, n_perm=300)


def _table(dcka, rf, dkl=None, family=None, noise=None):
    n = len(dcka)
    rng = np.random.default_rng(123)
    return pd.DataFrame({
        "model": "m",
        "degradation": [f"d{i}" for i in range(n)],
        "recovery": "kd",
        "family": family if family is not None else ["quantization"] * n,
        "performance_metric": "bench_mean",
        "delta_cka": np.asarray(dcka, float),
        "recovery_fraction": np.asarray(rf, float),
        "delta_kl": np.asarray(dkl, float) if dkl is not None else rng.normal(0, 0.1, n),
        "damage_within_noise": noise if noise is not None else [False] * n,
        "gain_within_noise": [False] * n,
    })


def _planted(seed=0, n=12):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.02, 0.3, n)
    y = 0.1 + 3.0 * x + rng.normal(0, 0.05, n)
    kl = rng.normal(-0.2, 0.05, n)
    return _table(x, y, kl)


def test_planted_correlation_supported():
    out = analyze(_planted(), **FAST)
    sp = out["correlations"]["spearman"]
    assert sp["estimate"] > 0.8 and sp["p_perm"] < 0.05
    assert out["correlations"]["pearson"]["p_perm"] < 0.05
    assert out["ols"]["coefficients"]["delta_cka"]["coef"] > 0
    assert out["ols"]["coefficients"]["delta_cka"]["p"] < 0.05
    assert out["verdict"] == "supported", out["reasons"]
    for c in out["correlations"].values():
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"]
    json.dumps(out, allow_nan=False)


def test_null_not_supported_and_p_roughly_uniform():
    small, supported = 0, 0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        t = _table(rng.normal(0.1, 0.05, 12), rng.normal(0.5, 0.3, 12), rng.normal(0, 0.1, 12))
        out = analyze(t, n_boot=100, n_perm=200, seed=seed)
        small += out["correlations"]["spearman"]["p_perm"] < 0.05
        supported += out["verdict"] == "supported"
    assert small / 40 <= 0.15
    assert supported / 40 <= 0.15


def test_deterministic():
    t = _planted(seed=3)
    a = analyze(t, seed=7, **FAST)
    b = analyze(t, seed=7, **FAST)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_too_few_artifacts():
    t = _planted(n=3)
    out = analyze(t, **FAST)
    assert out["verdict"] == "inconclusive"
    assert any("too few artifacts" in r for r in out["reasons"])
    assert out["n"] == 3
    json.dumps(out, allow_nan=False)
    # noise-flagged rows do not count
    t = _planted(n=6)
    t["damage_within_noise"] = [True, True, True, False, False, False]
    out = analyze(t, **FAST)
    assert out["n"] == 3 and out["verdict"] == "inconclusive" and len(out["excluded"]) == 3


def test_counterexample_refutes():
    t = _planted(seed=1)
    t.loc[0, ["delta_cka", "recovery_fraction"]] = [-0.05, 0.9]
    out = analyze(t, **FAST)
    assert out["verdict"] == "refuted"
    assert out["counterexamples"][0]["artifact"] == "m/d0/kd"
    # a within-noise gain is not a confident counterexample
    t["gain_within_noise"] = [True] + [False] * (len(t) - 1)
    assert analyze(t, **FAST)["counterexamples"] == []


def test_negative_correlation_ci_refutes():
    rng = np.random.default_rng(5)
    x = rng.uniform(0.02, 0.3, 20)
    t = _table(x, 0.9 - 2.0 * x + rng.normal(0, 0.03, 20), rng.normal(0, 0.1, 20))
    out = analyze(t, **FAST)
    assert out["correlations"]["spearman"]["ci_high"] < 0.3
    assert out["verdict"] == "refuted"


def test_families_and_collinear_kl_do_not_crash():
    t = _planted(n=12)
    t["family"] = ["quantization"] * 6 + ["pruning"] * 6
    out = analyze(t, **FAST)
    assert out["ols"]["includes_family"] and "C(family)[T.quantization]" in out["ols"]["coefficients"]
    t["delta_kl"] = 0.0
    out = analyze(t, **FAST)
    assert not out["ols"]["includes_delta_kl"]
    assert out["verdict"] != "supported"
    json.dumps(out, allow_nan=False)
    out = analyze(_planted(n=4), **FAST)  # minimal n: must not crash
    json.dumps(out, allow_nan=False)


def _arm_row(recovery, method, P, se=0.02, cka=0.9, kl=0.5, teacher="none", degradation="mag", checkpoint=False):
    return {"model": "m", "degradation": degradation, "recovery": recovery, "recovery_method": method, "P": P,
            "P_stderr": se, "cka_mean": cka, "kl": kl, "teacher": teacher, "checkpoint": checkpoint,
            "role": "teacher" if degradation == "none" and recovery == "none" else "recovered"}


def test_control_contrasts_pick_the_arms_and_holm_correct():
    from statsmodels.stats.multitest import multipletests

    from realign.analysis.stats import control_contrasts, undamaged_self_distillation

    table = pd.DataFrame([
        _arm_row("none", "none", 0.50, degradation="none", cka=1.0, kl=0.0),
        _arm_row("kd", "kd", 0.70, degradation="none", cka=0.99, kl=0.01),
        _arm_row("none", "none", 0.40, cka=0.80, kl=1.0),
        _arm_row("kd", "kd", 0.48, cka=0.90, kl=0.4),
        _arm_row("kd@step6", "kd", 0.10, checkpoint=True),  # checkpoints are never an arm
        _arm_row("kd+seed1", "kd", 0.10),  # nor replicates
        _arm_row("blocked", "alignment-blocked", 0.47, cka=0.60, kl=0.45),
        _arm_row("align", "alignment-only", 0.41, cka=0.95, kl=0.9),
        _arm_row("sft", "sft", 0.40, cka=0.85, kl=0.8),
        _arm_row("bad-teacher", "kd", 0.30, teacher="wanda-70", cka=0.7, kl=2.0),
    ])
    rows = {r["contrast"]: r for r in control_contrasts(table, alpha=0.05)}
    assert set(rows) == {"kd vs alignment-blocked", "alignment-only vs damaged", "kd vs sft",
                         "kd vs kd from a damaged teacher"}
    kd_blocked = rows["kd vs alignment-blocked"]
    assert kd_blocked["diff_P"] == pytest.approx(0.01) and kd_blocked["diff_cka"] == pytest.approx(0.30)
    assert kd_blocked["se"] == pytest.approx(np.sqrt(2) * 0.02)
    assert rows["kd vs kd from a damaged teacher"]["b"] == "m/mag/bad-teacher"
    ordered = list(rows.values())
    expected = multipletests([r["p"] for r in ordered], method="holm")[1]
    np.testing.assert_allclose([r["p_holm"] for r in ordered], expected)
    assert rows["kd vs kd from a damaged teacher"]["significant"] and not kd_blocked["significant"]
    (undamaged,) = undamaged_self_distillation(table)
    assert undamaged["artifact"] == "m/none/kd" and undamaged["diff_P"] == pytest.approx(0.20)
