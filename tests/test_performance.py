"""realign.analysis.performance: the paired item bootstrap against closed forms, pairing by item id, the registry."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from realign.analysis.performance import (MEASURES, bootstrap, bootstrap_p, interval, measure, paired_matrices,
                                          statistic)

A, B = ("m", "d", "none"), ("m", "d", "kd")


def _items(scores: dict[tuple, dict[str, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for (m, d, r), tasks in scores.items():
        for task, values in tasks.items():
            rows += [{"model": m, "degradation": d, "recovery": r, "stratum": task, "record": f"{task}-{i}",
                      "gold_logprob": float(v)} for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def _correlated(seed=0, sizes=(120, 60)):
    """Two tasks; B = A + a small item-level change: strongly paired, as damage and recovery are."""
    rng = np.random.default_rng(seed)
    a = {f"t{k}": rng.normal(-1.0, 0.8, n) for k, n in enumerate(sizes)}
    b = {t: v + 0.1 + rng.normal(0, 0.1, len(v)) for t, v in a.items()}
    return a, b


def test_paired_bootstrap_variance_equals_the_closed_form():
    a, b = _correlated()
    m = measure("bench_logprob")
    paired = paired_matrices(_items({A: a, B: b}), m, [A, B])
    boot = bootstrap(paired, m, 20000, seed=1)
    diff = boot[:, 1] - boot[:, 0]
    # P = mean over K tasks of item means; the bootstrap resamples each task's items (plug-in variance, ddof=0)
    k = len(a)
    closed = sum(np.var(b[t] - a[t]) / len(a[t]) for t in a) / k**2
    assert np.var(diff) == pytest.approx(closed, rel=0.05)
    assert statistic(paired, m)[1] - statistic(paired, m)[0] == pytest.approx(
        np.mean([np.mean(b[t] - a[t]) for t in a]))
    # Resampling each artifact on its own ignores the pairing: the variances of the two means add up.
    unpaired = bootstrap(paired, m, 20000, seed=1, joint=False)
    closed_unpaired = sum((np.var(a[t]) + np.var(b[t])) / len(a[t]) for t in a) / k**2
    assert np.var(unpaired[:, 1] - unpaired[:, 0]) == pytest.approx(closed_unpaired, rel=0.05)
    assert closed_unpaired > 20 * closed  # what pairing buys on correlated items


def test_the_ratio_measure_pools_tokens_and_is_oriented():
    seq = pd.DataFrame([{"model": "m", "degradation": "d", "recovery": "none", "stratum": "general",
                         "record": str(i), "nll_sum": s, "n_tokens": n} for i, (s, n) in enumerate([(10, 5), (3, 1)])])
    m = measure("nll_general")
    paired = paired_matrices(seq, m, [A])
    assert statistic(paired, m)[0] == pytest.approx(-13 / 6)  # pooled over tokens, negated: higher = better
    assert (bootstrap(paired, m, 50, seed=0) <= -3 / 2 + 1e-12).all()


def test_artifacts_scored_on_different_items_are_refused():
    a, b = _correlated()
    items = _items({A: a, B: b})
    items = items[~((items["recovery"] == "kd") & (items["record"] == "t1-3"))]
    with pytest.raises(ValueError, match=r"t1: m/d/none and m/d/kd were scored on different items \(only in the "
                                         r"first: \['t1-3'\]; only in the second: \[\]\); they cannot be paired"):
        paired_matrices(items, measure("bench_logprob"), [A, B])
    with pytest.raises(ValueError, match=r"no records for \['m/d/x'\]"):
        paired_matrices(_items({A: a}), measure("bench_logprob"), [A, ("m", "d", "x")])


def test_interval_and_p_value():
    rng = np.random.default_rng(0)
    assert interval(rng.normal(0, 1, 100000)) == pytest.approx((-1.96, 1.96), abs=0.03)
    assert np.isnan(interval(np.array([1.0, np.nan]))[0])
    assert bootstrap_p(rng.normal(3, 1, 10000)) < 0.01 and bootstrap_p(rng.normal(0, 1, 10000)) > 0.5
    assert bootstrap_p(np.ones(100)) == pytest.approx(0.01)  # never below 1 / n


def test_every_registered_measure_is_accepted_by_the_schema():
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    pattern = schema["properties"]["analysis"]["properties"]["performance"]["pattern"]
    for name in [*MEASURES, "acc:piqa"]:
        assert re.match(pattern, name), name
        assert measure(name).name == name
    with pytest.raises(ValueError, match="analysis.performance: unknown measure 'f1'"):
        measure("f1")
