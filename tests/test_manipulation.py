"""The manipulation check of the held arm (realign.analysis.manipulation) on constructed tables."""

import numpy as np
import pytest

from realign.analysis.manipulation import FAILED, NOT_EVALUATED, PASSED, manipulation_checks
from realign.analysis.settings import AnalysisSettings
from theta_tables import build, study

S = AnalysisSettings.defaults()  # held_cka_margin 0.25, kl_margin 0.2


def _table(held_cka=0.0, held_kl=0.12, **kw):
    rng = np.random.default_rng(0)
    return build(study(rng, gains={"kd": 0.2, "held": 0.05}, methods={"held": "alignment-held"},
                       delta_cka={"kd": 0.06, "held": held_cka}, kl={"kd": 0.1, "held": held_kl}, **kw))


def _parts(check):
    return {p.name: p for p in check.parts}


def test_a_held_arm_that_holds():
    (c,) = manipulation_checks(_table(), S)
    parts = _parts(c)
    assert c.passed and parts["delta_cka"].status == PASSED and parts["kl"].status == PASSED
    # limit: (0 + 0.25) x kd's 0.06; the runs' upper bound: 0 + the constructed half-width 0.005
    assert parts["delta_cka"].limit == pytest.approx(0.25 * 0.06) and parts["delta_cka"].value == 0.005
    # no interval of RBF CKA, Procrustes, k-NN in the table: reported, not required
    for name in ("rbf_cka", "procrustes_sim", "knn_overlap"):
        assert parts[name].status == NOT_EVALUATED and not parts[name].required
        assert "no " + name + "_mean_ci_high column" in parts[name].statement


def test_delta_cka_above_the_allowed_fraction_fails_and_a_dose_moves_the_limit():
    table = _table(held_cka=0.03)  # half of kd's re-alignment
    (c,) = manipulation_checks(table, S)
    assert not c.passed and _parts(c)["delta_cka"].status == FAILED
    (half,) = manipulation_checks(table, S, allowed_fraction={"held": 0.5})
    assert half.passed and half.allowed_fraction == 0.5
    assert _parts(half)["delta_cka"].limit == pytest.approx((0.5 + 0.25) * 0.06)


def test_outputs_that_do_not_match_fail_the_kl_part():
    # parent 0.5, kd 0.1: held may stay up to 0.1 + 0.2 x 0.4 = 0.18 (less its interval)
    (c,) = manipulation_checks(_table(held_kl=0.3), S)
    kl = _parts(c)["kl"]
    assert not c.passed and kl.status == FAILED and "did not hold while the outputs matched" in kl.statement
    (wide,) = manipulation_checks(_table(held_kl=0.3), S, kl_margin=0.6)
    assert wide.passed


def test_similarity_intervals_are_required_where_the_table_has_them():
    table = _table()
    table["rbf_cka_mean"] = 0.80
    table["rbf_cka_mean_ci_high"] = np.where(table.recovery == "none", 0.81, np.nan)
    (c,) = manipulation_checks(table, S)
    assert _parts(c)["rbf_cka"].status == PASSED and _parts(c)["rbf_cka"].required and c.passed
    table.loc[table.recovery == "held+seed1", "rbf_cka_mean"] = 0.83
    (c,) = manipulation_checks(table, S)
    assert _parts(c)["rbf_cka"].status == FAILED and not c.passed


def test_a_missing_delta_cka_interval_fails_the_check():
    table = _table()
    table.loc[table.recovery == "held", "delta_cka_ci_high"] = np.nan
    (c,) = manipulation_checks(table, S)
    assert _parts(c)["delta_cka"].status == NOT_EVALUATED and not c.passed
    assert c.failures[0].name == "delta_cka"
