"""Apply the pilot's selection rules (docs/2026-12-07-pilot.md, Part 1) to a finished pilot study: rule Q (the
quantization recipe), rule H (hold_rho per family), rule A (the alignment-only recipe) and, with --size, rule S (the
confirmatory sizes from the validated power simulation at the pilot's noise). The rules live on that page; this
applies them with the library's eligibility and check (realign.analysis.theta), nothing else.

    .venv/bin/python tools/pilot.py <study folder> [--kd DAMAGE=NAME,NAME ...] [--held DAMAGE=NAME,NAME ...]
                                    [--only DAMAGE=NAME,NAME ...] [--size] [--out pilot.json]

Each --kd/--held/--only lists one damage's candidate arms (configured recovery names) in the rule's order; a
damage not listed has the single arm of that method (kd, alignment-held, alignment-only). Reads the study's
results/table.parquet and its per-job times (results/benchmarks/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import yaml

from realign.analysis.arms import HELD_METHOD, KD_METHOD, Arm, pick
from realign.analysis.arms import arms_by_parent
from realign.analysis.provenance import job_times
from realign.analysis.settings import AnalysisSettings
from realign.analysis.table import read_table
from realign.analysis.theta.check import checks
from realign.analysis.theta.damage import ONLY_METHOD, Damage
from realign.analysis.theta.eligibility import eligibility
from realign.analysis.theta.power import Grid, JobCosts, study_power

SIZING_GRID = Grid(seeds=(3, 4, 6, 8), items=(1, 2, 4), probes=(1, 2, 4, 8))  # rule S
SIZING_PER_CELL = 100


def _candidates(specs: list[str] | None) -> dict[str, list[str]]:
    out = {}
    for spec in specs or []:
        damage, _, names = spec.partition("=")
        out[damage] = [n for n in names.split(",") if n]
    return out


def _mean_delta_cka(arm: Arm) -> float:
    return float(np.mean(arm.delta_cka))


def rule_q(arms, kd_names: dict[str, list[str]], settings) -> dict:
    """Per damage with kd candidates: each candidate's eligibility, judged with every other damage's kd (the seed
    part pooled across the pilot's damages, as the analysis pools it); the first eligible one in order."""
    out = {}
    fixed = {deg: pick(on, KD_METHOD, None) for (_, deg), on in arms.items() if deg not in kd_names}
    fixed = {deg: a for deg, a in fixed.items() if a is not None}
    for (model, deg), on_parent in arms.items():
        if deg not in kd_names:
            continue
        rows = []
        for name in kd_names[deg]:
            kd = pick(on_parent, KD_METHOD, name)
            if kd is None:
                rows.append({"kd": name, "eligible": False, "reasons": ["not run"]})
                continue
            damages = [Damage(a, None, None) for a in fixed.values()] + [Damage(kd, None, None)]
            e = eligibility(damages, settings)[-1]
            rows.append({"kd": name, **dataclasses.asdict(e)})
        chosen = next((r["kd"] for r in rows if r["eligible"]), None)
        out[deg] = {"candidates": rows, "chosen": chosen}
    # the kept damages' own eligibility (forgetting and pruning are kept unless ineligible)
    kept = eligibility([Damage(a, None, None) for a in fixed.values()], settings)
    out["kept"] = [dataclasses.asdict(e) for e in kept]
    return out


def rule_h(arms, kd_of: dict[str, str | None], held_names: dict[str, list[str]], settings) -> dict:
    """Per damage: each held candidate's check parts (point value and upper bound), in order; the first that passes
    in point (both parts' point values <= 0). Each candidate is checked on its damage alone, so its bounds' seed part
    is that damage's own (the confirmatory analysis pools it across damages)."""
    out = {}
    for (model, deg), on_parent in arms.items():
        if deg in kd_of and kd_of[deg] is None:  # a quantization damage no candidate made eligible
            continue
        kd = pick(on_parent, KD_METHOD, kd_of.get(deg))
        names = held_names.get(deg) or [None]
        rows = []
        for name in names:
            held = pick(on_parent, HELD_METHOD, name)
            if kd is None or held is None:
                continue
            (check,) = checks([Damage(kd, held, None)], settings)
            parts = {p.name: {"value": p.value, "upper": p.upper, "status": p.status, "statement": p.statement}
                     for p in check.parts if p.required}
            rows.append({"held": held.recovery, "parts": parts,
                         "passes_in_point": all(p["value"] <= 0 for p in parts.values()),
                         "passes": check.passed,
                         "h2_points": {p.name: p.value for p in check.parts if not p.required}})
        if rows:
            out[deg] = {"kd": kd.recovery, "candidates": rows,
                        "chosen": next((r["held"] for r in rows if r["passes_in_point"]), None)}
    return out


def rule_a(arms, kd_of: dict[str, str | None], only_names: dict[str, list[str]]) -> dict:
    """Per damage: each alignment-only candidate's mean delta CKA against kd's (rule A: >= in point); its gain is
    recorded, never selected on."""
    out = {}
    for (model, deg), on_parent in arms.items():
        if deg in kd_of and kd_of[deg] is None:
            continue
        kd = pick(on_parent, KD_METHOD, kd_of.get(deg))
        rows = []
        for name in only_names.get(deg) or [None]:
            only = pick(on_parent, ONLY_METHOD, name)
            if kd is None or only is None:
                continue
            rows.append({"only": only.recovery, "delta_cka": _mean_delta_cka(only), "kd_delta_cka": _mean_delta_cka(kd),
                         "reaches_kd": _mean_delta_cka(only) >= _mean_delta_cka(kd),
                         "gain": float(np.mean(only.P - only.parent.P)), "kd_gain": float(np.mean(kd.P - kd.parent.P))})
        if rows:
            out[deg] = {"candidates": rows, "chosen": next((r["only"] for r in rows if r["reaches_kd"]), None)}
    return out


def select(arms, kd_names: dict[str, list[str]], held_names: dict[str, list[str]],
           only_names: dict[str, list[str]], settings) -> dict:
    """Rules Q, H and A in order: H and A read the kd that Q chose."""
    q = rule_q(arms, kd_names, settings)
    kd_of = {deg: q[deg]["chosen"] for deg in kd_names if deg in q}
    return {"rule_q": q, "rule_h": rule_h(arms, kd_of, held_names, settings),
            "rule_a": rule_a(arms, kd_of, only_names)}


def chosen_arms(arms, kd_names: dict[str, list[str]], selected: dict) -> dict:
    """Per damage, the arms the rules chose (its kd, held and alignment-only), which rule S sizes. A quantization
    damage on which rule Q chose no candidate is left out: it has no kd to size."""
    q, h, a = selected["rule_q"], selected["rule_h"], selected["rule_a"]
    keep = {}
    for (model, deg), on_parent in arms.items():
        if deg in kd_names and not q.get(deg, {}).get("chosen"):
            continue
        kd = q[deg]["chosen"] if deg in kd_names else (pick(on_parent, KD_METHOD, None) or on_parent[0]).recovery
        names = {kd, (h.get(deg) or {}).get("chosen"), (a.get(deg) or {}).get("chosen")}
        keep[(model, deg)] = tuple(x for x in on_parent if x.recovery in names)
    return keep


def job_costs(study: Path, chosen: dict[str, set[str]]) -> tuple[JobCosts, dict]:
    """Mean seconds per job of this study (results/benchmarks/<rule>/...tsv, column s): training over the chosen
    arms' runs, divergence, evaluation, activations and similarity over every artifact."""
    jobs = job_times(study / "results" / "benchmarks")

    def seconds(rule: str, keep=lambda job: True) -> list[float]:
        of_rule = jobs[jobs["rule"] == rule]
        return [s for job, s in zip(of_rule["job"], of_rule["seconds"]) if keep(job)]

    def trained(job: str) -> bool:  # recover/<model>/<degradation>/<recovery>+seed<s>
        path = Path(job)
        return path.parent.name in chosen and path.name.split("+seed")[0] in chosen[path.parent.name]
    times = {"recover": seconds("recover", trained), "divergence": seconds("divergence"),
             "evaluate": seconds("evaluate"), "activations": seconds("activations"),
             "similarity": seconds("similarity")}
    mean = {k: float(np.mean(v)) if v else math.nan for k, v in times.items()}
    costs = JobCosts.from_job_means(mean)  # a rule with no job keeps its default
    return costs, {k: {"n": len(v), "mean_s": mean[k], "min_s": min(v, default=math.nan),
                       "max_s": max(v, default=math.nan)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--kd", action="append")
    ap.add_argument("--held", action="append")
    ap.add_argument("--only", action="append")
    ap.add_argument("--size", action="store_true", help="rule S: the power grid at the chosen arms' noise")
    ap.add_argument("--config", type=Path, help="the pilot's config (default: <study>/config.yaml)")
    ap.add_argument("--out", type=Path, default=Path("pilot.json"))
    args = ap.parse_args()
    settings = AnalysisSettings.from_config(yaml.safe_load((args.config or args.study / "config.yaml").read_text()))
    table = read_table(args.study / "results" / "table.parquet")
    arms = arms_by_parent(table)
    kd_names, held_names, only_names = _candidates(args.kd), _candidates(args.held), _candidates(args.only)
    out = select(arms, kd_names, held_names, only_names, settings)
    q, h, a = out["rule_q"], out["rule_h"], out["rule_a"]
    if args.size:
        keep = chosen_arms(arms, kd_names, out)
        # the kept damages that are eligible, and each quantization damage whose candidate rule Q chose (chosen_arms
        # has dropped the others)
        eligible = [e["damage"] for e in q["kept"] if e["eligible"]] + \
            [f"{m}/{deg}" for (m, deg) in keep if deg in kd_names]
        costs, measured = job_costs(args.study, {deg: {x.recovery for x in v} for (_, deg), v in keep.items()})
        out["rule_s"] = {"eligible": eligible, "job_times": measured,
                         "power": study_power(keep, settings, n_tables=200, grid=SIZING_GRID,
                                              per_cell=SIZING_PER_CELL, costs=costs, only=eligible,
                                              require_check=True)}
    args.out.write_text(json.dumps(out, indent=1, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    print(json.dumps({"quantization": {d: v["chosen"] for d, v in q.items() if d != "kept"},
                      "kept": {e["damage"]: e["eligible"] for e in q["kept"]},
                      "hold_rho": {d: v["chosen"] for d, v in h.items()},
                      "alignment_only": {d: v["chosen"] for d, v in a.items()},
                      "budget": out.get("rule_s", {}).get("power", {}).get("budget")}, indent=1))


if __name__ == "__main__":
    main()
