"""tools/pilot.py applies the pilot's selection rules (docs/2026-12-07-pilot.md) with the library's eligibility and
check: on a synthetic pilot table it must choose the first eligible quantization candidate in order, the first
hold_rho that passes the check in point, and the first alignment-only recipe that reaches kd's delta CKA."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from realign.analysis.arms import arms_by_parent
from realign.analysis.settings import AnalysisSettings
from theta_tables import add_theta_columns, build, study
from tiny_study import REPO

sys.path.insert(0, str(REPO / "tools"))
import pilot  # noqa: E402

S = AnalysisSettings.defaults(n_boot=200)
METHODS = {"held": "alignment-held", "held-rho3": "alignment-held", "only": "alignment-only",
           "only-lr1e-3": "alignment-only", "kd-lo": "kd", "kd-hi": "kd"}


def _pilot_table() -> pd.DataFrame:
    rng = np.random.default_rng(11)
    kept = study(rng, gains={"kd": 0.2, "held": 0.05, "held-rho3": 0.04, "only": 0.0, "only-lr1e-3": 0.01},
                 methods=METHODS, degradations=("prune", "forget"), seeds=2, seed_sd=0.005,
                 delta_cka={"kd": 0.05, "held": 0.04, "held-rho3": 0.0, "only": 0.03, "only-lr1e-3": 0.07},
                 kl={"kd": 0.1, "held": 0.12, "held-rho3": 0.15})
    quant = study(rng, gains={"kd-lo": 0.0, "kd-hi": 0.2}, methods=METHODS, degradations=("q3",), seeds=2,
                  seed_sd=0.005, delta_cka={"kd-lo": 0.0005, "kd-hi": 0.05})
    families = {"prune": "pruning", "forget": "forgetting", "q3": "quantization"}
    return add_theta_columns(build(kept + quant, n_boot=200), rng, family=families, cka_boot_sd=0.002)


def test_the_rules_choose_in_their_order():
    arms = arms_by_parent(_pilot_table())
    out = pilot.select(arms, {"q3": ["kd-lo", "kd-hi"]}, {"prune": ["held", "held-rho3"],
                                                          "forget": ["held", "held-rho3"]},
                       {"prune": ["only", "only-lr1e-3"], "forget": ["only", "only-lr1e-3"]}, S)
    q = out["rule_q"]["q3"]
    assert [c["kd"] for c in q["candidates"]] == ["kd-lo", "kd-hi"]
    assert not q["candidates"][0]["eligible"] and any("no lower bound" in r for r in q["candidates"][0]["reasons"])
    assert q["candidates"][1]["eligible"] and q["chosen"] == "kd-hi"
    assert all(e["eligible"] for e in out["rule_q"]["kept"])
    # held keeps 0.04 of kd's 0.05 (above 0.25 x 0.05): the CKA part fails in point; rho3's clamp holds it
    for deg in ("prune", "forget"):
        h = out["rule_h"][deg]
        first, second = h["candidates"]
        assert first["parts"]["delta_cka"]["value"] > 0 and not first["passes_in_point"]
        assert second["passes_in_point"] and h["chosen"] == "held-rho3"
        a = out["rule_a"][deg]
        assert [c["reaches_kd"] for c in a["candidates"]] == [False, True] and a["chosen"] == "only-lr1e-3"
    # the quantization damage has no held arm in this table: rule H says nothing about it
    assert "q3" not in out["rule_h"]
    # rule S sizes the chosen arms only
    sized = {deg: sorted(a.recovery for a in on) for (_, deg), on in pilot.chosen_arms(arms, {"q3": ["kd-lo", "kd-hi"]},
                                                                                      out).items()}
    assert sized == {"prune": ["held-rho3", "kd", "only-lr1e-3"], "forget": ["held-rho3", "kd", "only-lr1e-3"],
                     "q3": ["kd-hi"]}


def test_a_quantization_damage_no_candidate_makes_eligible_is_left_out_of_h_and_a():
    arms = arms_by_parent(_pilot_table())
    both = {"prune": ["held"], "forget": ["held"]}
    out = pilot.select(arms, {"q3": ["kd-lo"]}, both, {"prune": ["only"], "forget": ["only"]}, S)
    assert out["rule_q"]["q3"]["chosen"] is None
    assert "q3" not in out["rule_h"] and "q3" not in out["rule_a"]
    # and rule S does not size it: it has no kd (found on the pilot, where this raised on its several kd arms)
    assert set(d for _, d in pilot.chosen_arms(arms, {"q3": ["kd-lo"]}, out)) == {"prune", "forget"}
