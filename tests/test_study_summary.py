"""tools/study_summary.py: the numbers a dated results page quotes, read from a study folder's sealed stats.json
and its benchmark files; a stats.json edited after the report is refused."""

from __future__ import annotations

import functools
import sys

import pytest

from realign.analysis.stats import analyze_with_controls
from realign.io import jsonable, write_json
from test_theta_report import S, _table
from tiny_study import REPO

sys.path.insert(0, str(REPO / "tools"))
import study_summary  # noqa: E402

TIMES = {"recover/m/prune/kd.tsv": 80.0, "recover/m/prune/kd+seed1.tsv": 100.0,
         "recover/m/prune/held.tsv": 99.0, "recover/m/prune/held+seed1.tsv": 117.0,
         "evaluate/m/prune/kd.tsv": 60.0}


@functools.cache
def _stats() -> dict:
    return jsonable(analyze_with_controls(_table({"kd": 0.2, "held": 0.02}), S))


def _study(tmp_path, held_method="alignment-held"):
    stats = _stats()
    write_json(tmp_path / "results" / "stats.json", stats, digest=True)
    for job, seconds in TIMES.items():
        tsv = tmp_path / "results" / "benchmarks" / job.replace("held", held_method)
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:01:00\t1000\n")
    return stats


def test_the_summary_quotes_the_statistics_and_the_job_times(tmp_path):
    stats = _study(tmp_path)
    text = study_summary.summary(tmp_path)
    theta = stats["theta"]
    assert f"**Verdict: {theta['outcome']}**" in text and all(line in text for line in theta["lines"])
    for d in theta["damages"]:
        assert f"| {d['damage']} | {d['family']} | {d['theta']:.3f} | [{d['low']:.3f}, {d['high']:.3f}] |" in text
    for e in theta["eligibility"]:
        assert f"| {e['damage']} | {e['eligible']} | {e['damage_value']:.4f} ({e['damage_low']:.4f}) |" in text
    for c in theta["checks"]:
        assert all(p["statement"] in text for p in c["parts"])
    assert "| recover | 4 | 99.5 | 99.0 | 0.11 |" in text  # median of 80, 99, 100, 117; mean 99; 396 s
    assert "- held / kd on prune: 1.20 (mean 108 s against 90 s)" in text
    assert "Cheapest deciding design at the statistics' default job costs" in text


def test_an_edited_statistics_file_is_refused(tmp_path):
    _study(tmp_path)
    path = tmp_path / "results" / "stats.json"
    path.write_text(path.read_text().replace('"outcome"', '"outcome" ', 1))
    with pytest.raises(Exception, match="stats.json"):
        study_summary.summary(tmp_path)
