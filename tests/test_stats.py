"""realign.analysis.stats: planted vs null correlations, determinism, small n, JSON output, refutation."""

import json

import numpy as np
import pytest
import pandas as pd

from realign.analysis.stats import analyze
from realign.io import jsonable
from item_records import records_for

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
    assert out["association"] == "supported", out["reasons"]
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
        supported += out["association"] == "supported"
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
    assert out["association"] == "inconclusive"
    assert any("too few artifacts" in r for r in out["reasons"])
    assert out["n"] == 3
    json.dumps(out, allow_nan=False)
    # noise-flagged rows do not count
    t = _planted(n=6)
    t["damage_within_noise"] = [True, True, True, False, False, False]
    out = analyze(t, **FAST)
    assert out["n"] == 3 and out["association"] == "inconclusive" and len(out["excluded"]) == 3


def test_counterexample_refutes():
    t = _planted(seed=1)
    t.loc[0, ["delta_cka", "recovery_fraction"]] = [-0.05, 0.9]
    out = analyze(t, **FAST)
    assert out["association"] == "refuted"
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
    assert out["association"] == "refuted"


def test_families_and_collinear_kl_do_not_crash():
    t = _planted(n=12)
    t["family"] = ["quantization"] * 6 + ["pruning"] * 6
    out = analyze(t, **FAST)
    assert out["ols"]["includes_family"] and "C(family)[T.quantization]" in out["ols"]["coefficients"]
    t["delta_kl"] = 0.0
    out = analyze(t, **FAST)
    assert not out["ols"]["includes_delta_kl"]
    assert out["association"] != "supported"
    json.dumps(out, allow_nan=False)
    out = analyze(_planted(n=4), **FAST)  # minimal n: must not crash
    json.dumps(out, allow_nan=False)


_ARM_SEEDS = iter(range(1000, 2000))


def _arm_row(recovery, method, P, se=0.02, cka=0.9, kl=0.5, teacher="none", degradation="mag", checkpoint=False):
    """An arm whose bootstrap replicates are P + se * z, z independent of every other arm's."""
    boot = P + se * np.random.default_rng(next(_ARM_SEEDS)).standard_normal(4000)
    return {"model": "m", "degradation": degradation, "recovery": recovery, "recovery_method": method, "P": P,
            "P_stderr": se, "P_boot": boot, "cka_mean": cka, "kl": kl, "teacher": teacher, "checkpoint": checkpoint,
            "role": "teacher" if degradation == "none" and recovery == "none" else "recovered"}


def test_control_contrasts_pick_the_arms_and_holm_correct():
    from statsmodels.stats.multitest import multipletests

    from realign.analysis.contrasts import control_contrasts, undamaged_self_distillation

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
    assert kd_blocked["se"] == pytest.approx(np.sqrt(2) * 0.02, rel=0.05)  # independent replicates: se's add
    assert kd_blocked["ci_low"] == pytest.approx(0.01 - 1.96 * np.sqrt(2) * 0.02, abs=0.004)
    assert rows["kd vs kd from a damaged teacher"]["b"] == "m/mag/bad-teacher"
    ordered = list(rows.values())
    expected = multipletests([r["p"] for r in ordered], method="holm")[1]
    np.testing.assert_allclose([r["p_holm"] for r in ordered], expected)
    assert rows["kd vs kd from a damaged teacher"]["significant"] and not kd_blocked["significant"]
    (undamaged,) = undamaged_self_distillation(table)
    assert undamaged["artifact"] == "m/none/kd" and undamaged["diff_P"] == pytest.approx(0.20)


# ---------------------------------------------------------------- per benchmark, mixed model, dose-response


def _art(degradation, recovery, acc, cka, kl, se=(0.01, 0.05), model="m", step=None):
    """A collect_row-like row with two benchmark tasks a and b (acc = (acc_a, acc_b))."""
    from realign.identity import parse_recovery_name

    base, _, ck_step = parse_recovery_name(recovery)
    row = {"model": model, "degradation": degradation, "recovery": recovery, "family": "pruning",
           "recovery_method": "none" if recovery == "none" else base.split("+")[0], "recovery_base": base,
           "checkpoint": ck_step is not None, "step": float(step) if step is not None else np.nan,
           "teacher": "none", "tasks": "a,b", "cka_mean": cka, "kl": kl}
    for task, a, s in zip("ab", acc, se):
        row[f"acc_{task}"], row[f"acc_{task}_stderr"] = a, s
    row["bench_mean"] = float(np.mean(acc))
    row["bench_mean_stderr"] = float(np.sqrt(sum(s * s for s in se)) / 2)
    return row


def _two_task_table():
    from realign.analysis.table import build_table

    rows = [
        _art("none", "none", (0.80, 0.60), 1.0, 0.0),
        _art("none", "kd", (0.79, 0.61), 0.99, 0.01, step=12),  # self-distillation: no damage, not listed
        _art("d1", "none", (0.40, 0.55), 0.70, 2.0),
        _art("d1", "kd", (0.70, 0.58), 0.90, 1.0, step=12),
        _art("d1", "kd@step6", (0.50, 0.56), 0.80, 1.5, step=6),  # checkpoint: dose-response only
    ]
    return build_table(rows, "bench_mean", records_for(rows))


def test_per_benchmark_hand_checked_two_tasks():
    from realign.analysis.breakdowns import per_benchmark

    out = per_benchmark(_two_task_table(), n_boot=100, n_perm=100)
    rows = {r["task"]: r for r in out["rows"]}
    assert [r["artifact"] for r in out["rows"]] == ["m/d1/kd", "m/d1/kd"]
    a, b = rows["a"], rows["b"]
    # a: damage 0.80 - 0.40 = 0.40 > 2 sqrt(0.01^2 + 0.01^2) = 0.028; gain 0.30 > 0.028; fraction 0.75
    assert a["damage"] == pytest.approx(0.40) and not a["damage_within_noise"]
    assert a["gain"] == pytest.approx(0.30) and not a["gain_within_noise"]
    assert a["recovery_fraction"] == pytest.approx(0.75)
    assert a["damage_stderr"] == pytest.approx(np.sqrt(2) * 0.01)
    # b: damage 0.05 < 2 sqrt(2) 0.05 = 0.141 (within noise); gain 0.03 (within noise); fraction 0.6
    assert b["damage"] == pytest.approx(0.05) and b["damage_within_noise"]
    assert b["gain"] == pytest.approx(0.03) and b["gain_within_noise"]
    assert b["recovery_fraction"] == pytest.approx(0.6)
    for r in (a, b):
        assert r["delta_cka"] == pytest.approx(0.20) and r["delta_kl"] == pytest.approx(-1.0)
    assert [s["task"] for s in out["spearman"]] == ["a", "b"]
    assert all("skipped" in s for s in out["spearman"])  # one artifact per task
    json.dumps(out, allow_nan=False)


def test_per_benchmark_spearman_per_task():
    from realign.analysis.breakdowns import per_benchmark
    from realign.analysis.table import build_table

    rows = [_art("none", "none", (0.80, 0.60), 1.0, 0.0)]
    for i in range(5):  # task a: damage 0.4 beyond noise, recovery rises with delta_cka; task b: no damage
        rows.append(_art(f"d{i}", "none", (0.40, 0.60), 0.70, 2.0))
        rows.append(_art(f"d{i}", "kd", (0.40 + 0.05 * (i + 1), 0.60), 0.70 + 0.02 * (i + 1), 1.0, step=12))
    out = per_benchmark(build_table(rows, "bench_mean", records_for(rows)), n_boot=200, n_perm=200)
    sp = {s["task"]: s for s in out["spearman"]}
    assert sp["a"]["n"] == 5 and sp["a"]["estimate"] == pytest.approx(1.0)
    assert sp["a"]["p_perm"] < 0.05
    assert sp["b"]["n"] == 0 and "skipped" in sp["b"]


def _mixed_rows(n_models, per_model=8, seed=0, coef=3.0, kl_coef=-0.5):
    rng = np.random.default_rng(seed)
    rows = []
    for g, offset in zip(range(n_models), (0.0, 0.3, -0.2, 0.15)):
        x = rng.uniform(0.0, 0.2, per_model)
        kl = rng.normal(-1.0, 0.3, per_model)
        y = 0.2 + offset + coef * x + kl_coef * kl + rng.normal(0, 0.03, per_model)
        rows += [{"model": f"m{g}", "delta_cka": a, "delta_kl": b, "recovery_fraction": c}
                 for a, b, c in zip(x, kl, y)]
    return pd.DataFrame(rows)


def test_mixed_model_recovers_planted_fixed_effect():
    from realign.analysis.regression import mixed_model

    out = mixed_model(_mixed_rows(3))
    assert out["n_groups"] == 3 and out["n"] == 24 and out["groups"] == {"m0": 8, "m1": 8, "m2": 8}
    cka, kl = out["coefficients"]["delta_cka"], out["coefficients"]["delta_kl"]
    assert cka["ci_low"] < 3.0 < cka["ci_high"] and cka["coef"] == pytest.approx(3.0, abs=0.3)
    assert kl["ci_low"] < -0.5 < kl["ci_high"] and cka["p"] < 1e-6
    assert out["group_variance"] > 0.01  # intercepts 0, 0.3, -0.2: variance about 0.06
    assert out["converged"]
    json.dumps(jsonable(out), allow_nan=False)


def test_mixed_model_skips_and_survives_singular_fits():
    from realign.analysis.regression import mixed_model

    assert "skipped" in mixed_model(_mixed_rows(1))
    two = _mixed_rows(2)
    assert "skipped" in mixed_model(pd.concat([two[two.model == "m0"], two[two.model == "m1"].head(1)]))
    three = _mixed_rows(3)
    out = mixed_model(pd.concat([three, pd.DataFrame([{"model": "m9", "delta_cka": 0.1, "delta_kl": -1.0,
                                                       "recovery_fraction": 0.5}])]))
    assert out["n_groups"] == 3 and "m9" in out["notes"][0]
    out = mixed_model(_mixed_rows(3).assign(delta_cka=0.1))  # constant regressor: singular
    assert "constant" in out["error"]
    json.dumps(jsonable(out), allow_nan=False)
    # no variation between the models: the group variance sits on the boundary 0; reported, not raised
    # (a small residual, no group effect: an exact fit has zero residual variance too, and whether REML then
    # fails as singular depends on the BLAS kernels of the machine)
    exact = _mixed_rows(3)
    exact["recovery_fraction"] = (3.0 * exact["delta_cka"] - 0.5 * exact["delta_kl"]
                                  + 0.01 * np.sin(1.7 * np.arange(len(exact))))
    out = mixed_model(exact)
    assert out["coefficients"]["delta_cka"]["coef"] == pytest.approx(3.0, abs=0.05) and out["group_variance"] < 1e-5
    assert any("boundary" in w for w in out["warnings"])
    json.dumps(jsonable(out), allow_nan=False)


def test_dose_response_planted_linear_trajectory():
    from scipy import stats as sps

    from realign.analysis.dose_response import dose_response
    from realign.analysis.table import build_table

    rows = [_art("none", "none", (0.80, 0.60), 1.0, 0.0), _art("d1", "none", (0.40, 0.40), 0.70, 2.0)]
    for step in (3, 6, 9, 12):  # P = 0.4 + 0.3 f, cka = 0.7 + 0.2 f at step fraction f: dP/dcka = 1.5
        f = step / 12
        name = "kd" if step == 12 else f"kd@step{step}"
        rows.append(_art("d1", name, (0.4 + 0.3 * f,) * 2, 0.7 + 0.2 * f, 2.0 - f, step=step))
    rows.append(_art("d1", "kd+seed1@step6", (0.5, 0.5), 0.75, 1.6, step=6))  # replicate, final not measured
    rows.append(_art("d1", "sdft", (0.5, 0.5), 0.75, 1.6, step=12))  # no checkpoints: no trajectory
    (run, rep) = dose_response(build_table(rows, "bench_mean", records_for(rows)))
    assert run["artifact"] == "m/d1/kd" and run["final_step"] == 12 and not run["damage_within_noise"]
    assert [p["kind"] for p in run["points"]] == ["damaged", "checkpoint", "checkpoint", "checkpoint", "final"]
    assert [p["step_fraction"] for p in run["points"]] == [0, 0.25, 0.5, 0.75, 1.0]
    s = run["slopes"]
    assert s["P_vs_cka"]["slope"] == pytest.approx(1.5)
    assert s["cka_vs_step"]["slope"] == pytest.approx(0.2) and s["P_vs_step"]["slope"] == pytest.approx(0.3)
    assert s["P_vs_cka"]["se"] == pytest.approx(0, abs=1e-9) and s["P_vs_cka"]["n"] == 5
    # the replicate's checkpoint belongs to run kd+seed1, not kd; parent + one checkpoint = slope only
    assert rep["recovery"] == "kd+seed1" and len(rep["points"]) == 2
    assert rep["slopes"]["P_vs_cka"]["slope"] == pytest.approx(2.0) and rep["slopes"]["P_vs_cka"]["se"] is None
    assert "2 points" in rep["slopes"]["P_vs_cka"]["note"] and rep["notes"]
    json.dumps(run, allow_nan=False)

    # with scatter: slope, se and p as scipy's linregress; the CI is the t interval
    from realign.analysis.regression import slope as _slope

    x, y = np.array([0.0, 0.25, 0.5, 0.75, 1.0]), np.array([0.40, 0.49, 0.53, 0.64, 0.70])
    ref, got = sps.linregress(x, y), _slope(x, y, 0.05)
    assert got["slope"] == pytest.approx(ref.slope) and got["se"] == pytest.approx(ref.stderr)
    assert got["p"] == pytest.approx(ref.pvalue)
    assert got["ci_high"] - got["slope"] == pytest.approx(sps.t.ppf(0.975, 3) * ref.stderr)


def test_reasons_state_both_falsification_criteria():
    out = analyze(_planted(), **FAST)
    assert out["reasons"][0].startswith("falsification criterion 'performance recovers while CKA stays low': "
                                        "not observed")
    assert out["reasons"][1].startswith("falsification criterion 'CKA rises without performance':")
    assert out["reasons"][2].startswith("across artifacts:") and "not observed" in out["reasons"][2]
    t = _planted(seed=1)
    t.loc[0, ["delta_cka", "recovery_fraction"]] = [-0.05, 0.9]
    t.loc[1, ["delta_cka", "recovery_fraction"]] = [0.5, 0.0]  # largest CKA rise, no recovery
    out = analyze(t, **FAST)
    assert out["association"] == "refuted"
    assert "OBSERVED (refutes)" in out["reasons"][0] and "m/d0/kd" in out["reasons"][0]
    assert "seen in 1 artifact(s)" in out["reasons"][1] and "m/d1/kd" in out["reasons"][1]


def test_analyze_with_controls_adds_the_new_keys():
    from realign.analysis.stats import analyze_with_controls

    out = analyze_with_controls(_two_task_table(), n_boot=100, n_perm=100)
    assert {"per_benchmark", "mixed_model", "dose_response", "contrasts"} <= set(out)
    assert out["association"] == "inconclusive" and "skipped" in out["mixed_model"]
    assert out["dose_response"][0]["artifact"] == "m/d1/kd" and len(out["dose_response"][0]["points"]) == 3
    assert len(out["per_benchmark"]["rows"]) == 2
    json.dumps(out, allow_nan=False)
