"""The on-demand benchmark tools that the dated cost pages quote: the job-time comparison, the fp32-vs-bf16
check's paired statistics, and the bf16 training check's rule."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from tiny_study import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import _timing  # noqa: E402
import bf16_training_check  # noqa: E402
import job_times  # noqa: E402
import precision_check  # noqa: E402


def _tsv(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\n" f"{seconds}\t0:00:00\t100.0\n")


def test_job_times_pairs_the_same_jobs_of_two_folders(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    _tsv(before / "benchmarks/recover/m/d/kd.tsv", 80.0)
    _tsv(after / "benchmarks/recover/m/d/kd.tsv", 60.0)
    _tsv(before / "benchmarks/evaluate/m/d/none.tsv", 90.0)
    _tsv(after / "benchmarks/content_states/m/d.tsv", 20.0)
    both = job_times.compare(before, after, None, everything=False)
    assert both[["rule", "job", "seconds_before", "seconds_after"]].values.tolist() == \
        [["recover", "recover/m/d/kd", 80.0, 60.0]]
    assert both["ratio"].tolist() == [0.75]
    assert len(job_times.compare(before, after, None, everything=True)) == 3
    assert job_times.compare(before, after, ["evaluate"], everything=True)["job"].tolist() == ["evaluate/m/d/none"]


def test_the_report_sums_the_same_job_times_per_rule(tmp_path):
    """The report's per-rule timings (provenance.rule_timings) and the comparison read one reader (job_times):
    seconds summed per rule, the largest RSS, an unmeasured RSS ('-') read as missing, not as an error."""
    from realign.analysis.provenance import job_times as read_jobs, rule_timings

    root = tmp_path / "benchmarks"
    _tsv(root / "recover/m/d/kd+seed1.tsv", 80.0)
    _tsv(root / "recover/m/d/kd+seed2.tsv", 70.5)
    (root / "evaluate/m/d").mkdir(parents=True)
    (root / "evaluate/m/d/none.tsv").write_text("s\th:m:s\tmax_rss\n9.0\t0:00:09\t-\n")
    jobs = read_jobs(root)
    assert jobs["job"].tolist() == ["evaluate/m/d/none", "recover/m/d/kd+seed1", "recover/m/d/kd+seed2"]
    assert math.isnan(jobs["max_rss_mb"].iloc[0])
    assert rule_timings(root) == {"evaluate": {"n": 1, "seconds": 9.0, "max_rss_mb": 0.0},
                                  "recover": {"n": 2, "seconds": 150.5, "max_rss_mb": 100.0}}


def test_the_paired_gain_weights_tasks_equally_and_its_se_is_the_item_se():
    rng = np.random.default_rng(0)
    index = pd.MultiIndex.from_tuples([("a", str(i)) for i in range(40)] + [("b", str(i)) for i in range(10)],
                                      names=["task", "item_id"])
    base = pd.Series(rng.normal(-1, 0.5, len(index)), index=index)
    shift = pd.Series(np.r_[np.full(40, 0.1), np.full(10, 0.3)] + rng.normal(0, 0.05, 50), index=index)
    gain, se = precision_check.paired(base + shift, base)
    by_task = shift.groupby(level="task")
    assert gain == pytest.approx(by_task.mean().mean())  # 0.2, not the item-weighted 0.14
    assert abs(gain - 0.2) < 0.03
    assert se == pytest.approx(math.sqrt(by_task.var().div(by_task.size()).sum()) / 2)
    # a shift that is the same on every item has no item noise
    assert precision_check.paired(base + 0.1, base)[1] == pytest.approx(0, abs=1e-12)


def _artifact(results, damage, recovery, shift: float, cka: float):
    """A measured artifact: 20 items of two tasks whose gold log-probs are the parent's + `shift`, and its CKA."""
    import json

    folder = results / "eval/m" / damage
    folder.mkdir(parents=True, exist_ok=True)
    base = np.linspace(-2, -1, 20)
    pd.DataFrame({"task": ["a"] * 10 + ["b"] * 10, "item_id": [str(i) for i in range(20)],
                  "gold_logprob": base + shift}).to_parquet(folder / f"{recovery}.items.parquet")
    summary = results / "similarity/m" / damage / f"{recovery}.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"layer_means": {"debiased_cka": cka}, "debiased_cka_mean_replicates": [cka] * 3}))


def test_the_bf16_training_check_applies_its_rule_per_damage_and_quantity(tmp_path):
    """Each bf16 run within the fp32 seeds' range and within one seed SD of the fp32 run at its seed; a control
    that differs sends the same-seed comparison to the check folder's own fp32 runs."""
    fp32, here = tmp_path / "fp32", tmp_path / "here"
    gains = {200: 0.10, 201: 0.14, 202: 0.12, 203: 0.08, 204: 0.11, 205: 0.13}  # sd 0.0216
    for folder in (fp32, here):
        _artifact(folder, "d", "none", 0.0, 0.5)
    for seed, gain in gains.items():
        _artifact(fp32, "d", f"kd+seed{seed}", gain, 0.5 + gain)
    _artifact(here, "d", "kd+seed200", gains[200], 0.5 + gains[200])  # the control: the same numbers
    _artifact(here, "d", "kd-bf16+seed200", 0.11, 0.61)
    _artifact(here, "d", "kd-bf16+seed201", 0.125, 0.625)
    args = dict(model="m", damages=["d"], fp32_arm="kd", bf16_arm="kd-bf16", fp32_seeds=list(gains),
                bf16_seeds=[200, 201], control_seed=200)
    controls, rules = bf16_training_check.check(fp32, here, **args)
    assert controls["same"].tolist() == [True]
    assert rules["quantity"].tolist() == ["gain", "delta_cka"] and rules["passes"].all()
    assert rules.loc[0, "same_seed_differences"] == pytest.approx([0.01, -0.015])
    assert rules.loc[0, "fp32_sd"] == pytest.approx(np.std(list(gains.values()), ddof=1))
    # a bf16 run beyond one seed SD of its fp32 twin fails, though inside the range
    _artifact(here, "d", "kd-bf16+seed201", 0.09, 0.59)
    rules = bf16_training_check.check(fp32, here, **args)[1]
    assert rules["within_range"].all() and not rules["within_sd"].any() and not rules["passes"].any()
    # a control that differs: the same-seed comparison reads the check folder's fp32 runs, which must exist
    _artifact(here, "d", "kd+seed200", 0.105, 0.605)
    with pytest.raises(FileNotFoundError, match=r"kd\+seed201"):
        bf16_training_check.check(fp32, here, **args)
    _artifact(here, "d", "kd+seed201", 0.085, 0.585)
    controls, rules = bf16_training_check.check(fp32, here, **args)
    assert not controls["same"].any() and controls.loc[0, "gain_difference"] == pytest.approx(0.005)
    assert rules.loc[0, "same_seed_differences"] == pytest.approx([0.005, 0.005]) and rules["passes"].all()


def test_gemm_rates_are_measured_in_both_precisions_and_the_peak_is_the_best_of_each():
    rates = _timing.gemm_rates({"small": (32, 16, 8)})
    assert set(rates) == {"fp32", "bf16"} and all(r["small"] > 0 for r in rates.values())
    runs = [{"fp32": {"a": 1.0, "b": 5.0}, "bf16": {"a": 7.0, "b": 2.0}},
            {"fp32": {"a": 3.0, "b": 4.0}, "bf16": {"a": 6.0, "b": 9.0}}]
    assert _timing.best_rates(runs) == {"fp32": {"a": 3.0, "b": 5.0}, "bf16": {"a": 7.0, "b": 9.0}}
