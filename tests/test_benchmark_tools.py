"""The on-demand benchmark tools that the dated cost page quotes: the job-time comparison and the fp32-vs-bf16
check's paired statistics."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest

from tiny_study import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
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
