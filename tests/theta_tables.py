"""Constructed analysis tables for the theta analysis (realign.analysis.estimand, manipulation, arm_tests,
preregistered): the columns those modules read, with P and its jointly drawn item-bootstrap replicates P_boot
computed from per-item scores exactly as realign.analysis.performance does (one set of resampled item indices
per replicate, applied to every artifact).

A study is described by per-item score vectors: items share a difficulty (common to every artifact: what the
pairing cancels), each artifact adds its own item-level noise, and each run its seed effect. `Run` gives one
artifact; `build` turns runs (damaged parents included, recovery "none") into a table."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Run:
    degradation: str
    recovery: str               # artifact name: "kd", "kd+seed1", "none" for the damaged parent
    method: str                 # recovery_method ("none" for a parent)
    items: np.ndarray           # per-item scores on the primary measure
    delta_cka: float = 0.0
    cka_halfwidth: float = 0.005
    kl: float = 0.1
    kl_stderr: float = 0.002
    teacher: str = "none"
    model: str = "m"
    extra: dict = field(default_factory=dict)


def build(runs: list[Run], n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    n = len(runs[0].items)
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    rows = []
    for r in runs:
        x = np.asarray(r.items, float)
        parent = r.recovery == "none"
        rows.append({"model": r.model, "degradation": r.degradation, "recovery": r.recovery,
                     "recovery_method": r.method, "teacher": r.teacher,
                     "role": "degraded" if parent else "recovered", "P": float(x.mean()),
                     "P_boot": x[idx].mean(1), "n_records": n,
                     "delta_cka": 0.0 if parent else r.delta_cka,
                     "delta_cka_ci_low": np.nan if parent else r.delta_cka - r.cka_halfwidth,
                     "delta_cka_ci_high": np.nan if parent else r.delta_cka + r.cka_halfwidth,
                     "kl": r.kl, "kl_stderr": r.kl_stderr, **r.extra})
    return pd.DataFrame(rows)


def study(rng: np.random.Generator, *, gains: dict[str, float], methods: dict[str, str] | None = None,
          degradations: tuple[str, ...] = ("q4",), seeds: int = 2, n_items: int = 400, item_sd: float = 0.3,
          own_sd: float = 0.1, seed_sd: float | dict[str, float] = 0.0, delta_cka: dict[str, float] | None = None,
          kl: dict[str, float] | None = None, parent_kl: float = 0.5, shared_seed_sd: float = 0.0,
          arm_item_sd: float = 0.0) -> list[Run]:
    """Runs of arms `gains` (arm name -> true gain over the parent) on each damaged parent, `seeds` runs each
    (artifact names `<arm>` and `<arm>+seed<i>`); per-item scores = difficulty (sd item_sd, shared by every
    artifact) + level + own noise (sd own_sd) + a seed effect per run (sd seed_sd, per arm when a dict); with
    shared_seed_sd > 0 also a seed effect u_s (sd shared_seed_sd) that every arm's seed-s run shares (the same data
    order), drawn per damaged parent after its parent's scores; with arm_item_sd > 0 an item-level effect per arm
    (sd arm_item_sd per item) that the arm's runs share, drawn before the arm's runs."""
    methods = methods or {}
    difficulty = rng.normal(0.0, item_sd, n_items)
    runs = []
    for d in degradations:
        runs.append(Run(d, "none", "none", difficulty + rng.normal(0.0, own_sd, n_items), kl=parent_kl))
        shared = rng.normal(0.0, shared_seed_sd, seeds) if shared_seed_sd > 0 else np.zeros(seeds)
        for arm, gain in gains.items():
            sd = seed_sd[arm] if isinstance(seed_sd, dict) else seed_sd
            arm_items = rng.normal(0.0, arm_item_sd, n_items) if arm_item_sd > 0 else 0.0
            for s in range(seeds):
                name = arm if s == 0 else f"{arm}+seed{s}"
                items = (difficulty + gain + shared[s] + arm_items + rng.normal(0.0, sd)
                         + rng.normal(0.0, own_sd, n_items))
                runs.append(Run(d, name, methods.get(arm, arm), items,
                                delta_cka=(delta_cka or {}).get(arm, 0.05), kl=(kl or {}).get(arm, 0.1)))
    return runs


def add_theta_columns(table: pd.DataFrame, rng: np.random.Generator | None = None, *,
                      family: str | dict[str, str] = "quantization", damage: float = 0.3,
                      damage_low: float | None = None, changed_fraction: float | dict[str, float] = 1.0,
                      cka_boot_sd: float | None = None, n_cka_boot: int = 200) -> pd.DataFrame:
    """A copy of a `build` table with the columns realign.analysis.theta reads beyond `build`'s: the parent's
    `damage` and `damage_ci_low` (default damage - 0.05), `family` and every run's `changed_fraction` (one value,
    or per degradation), and, with `cka_boot_sd`, `delta_cka_boot`: paired probe-bootstrap replicates, run minus
    parent, delta_cka + one draw per replicate (sd cka_boot_sd) shared by every run of the damaged parent (one
    probe set)."""
    t = table.copy()
    per = lambda v, d: v[d] if isinstance(v, dict) else v  # noqa: E731
    parent = t["recovery"] == "none"
    t["family"] = [per(family, d) for d in t["degradation"]]
    t["damage"] = np.where(parent, damage, np.nan)
    t["damage_ci_low"] = np.where(parent, damage - 0.05 if damage_low is None else damage_low, np.nan)
    t["changed_fraction"] = [np.nan if p else per(changed_fraction, d) for p, d in zip(parent, t["degradation"])]
    if cka_boot_sd is not None:
        rng = rng if rng is not None else np.random.default_rng(0)
        eta = {d: rng.normal(0.0, cka_boot_sd, n_cka_boot) for d in t["degradation"].unique()}
        t["delta_cka_boot"] = [None if p else (c + eta[d]).tolist()
                               for p, c, d in zip(parent, t["delta_cka"], t["degradation"])]
    return t
