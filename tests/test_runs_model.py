"""realign.analysis.regression.runs_model: the correlational description in the study's units (runs, their
checkpoints as repeated measures, a random effect per damaged parent), on constructed tables."""

import numpy as np
import pandas as pd

from realign.analysis.regression import runs_model


def _table(n_parents=3, seeds=(0, 1), steps=(4, 8), slope=0.8, parent_sd=0.3, run_sd=0.05, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_parents):
        shift = rng.normal(0, parent_sd)  # every run on this parent shares it: not independent artifacts
        rows.append({"model": "m", "degradation": f"d{p}", "recovery": "none", "recovery_fraction": np.nan,
                     "delta_cka": np.nan, "delta_kl": np.nan, "damage_within_noise": False})
        for arm in ("kd", "held"):
            for s in seeds:
                run_shift = rng.normal(0, run_sd)
                name = arm if s == 0 else f"{arm}+seed{s}"
                for k, step in enumerate((*steps, None)):
                    x = rng.uniform(-0.1, 0.1) + 0.03 * k + (0.05 if arm == "kd" else -0.05)
                    rows.append({"model": "m", "degradation": f"d{p}",
                                 "recovery": name if step is None else f"{name}@step{step}",
                                 "recovery_fraction": 0.3 + shift + run_shift + slope * x + rng.normal(0, noise),
                                 "delta_cka": x, "delta_kl": rng.normal(-1, 0.2), "damage_within_noise": False})
    return pd.DataFrame(rows)


def test_recovers_a_planted_within_slope_despite_a_large_shared_parent_effect():
    out = runs_model(_table())
    assert "error" not in out and "skipped" not in out, out
    assert out["n_parents"] == 3 and out["n_runs"] == 12 and out["repeated"] == 12 and out["n"] == 36
    c = out["coefficients"]["delta_cka"]
    assert c["ci_low"] < 0.8 < c["ci_high"] and c["ci_high"] - c["ci_low"] < 0.4
    assert "per damaged parent" in out["structure"] and "slope" in out["structure"]
    assert out["variance_components"]["parent"] > 0.01  # the parent effect is found, not folded into noise


def test_one_parent_with_checkpoints_groups_by_run_and_independent_runs_are_skipped():
    one = _table(n_parents=1)
    out = runs_model(one)
    assert out["n_parents"] == 1 and out["structure"].startswith("one damaged parent")
    assert set(out["variance_components"]) == {"run", "run_slope"}
    finals = one[~one["recovery"].str.contains("@")]
    skipped = runs_model(finals)
    assert "skipped" in skipped and "none measured at checkpoints" in skipped["skipped"]
    within_noise = _table().assign(damage_within_noise=True)
    assert runs_model(within_noise)["n"] == 0


def test_rows_of_a_parent_within_noise_are_left_out():
    t = _table()
    t.loc[t["degradation"] == "d0", "damage_within_noise"] = True
    out = runs_model(t)
    assert out["n_parents"] == 2 and out["n"] == 24
