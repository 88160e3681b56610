"""The numbers a dated results page quotes, from a finished study folder, as Markdown: the verdict and its sentence
per damage, theta per damage with its interval, each held arm's manipulation check, H1' and H2, eligibility, the
simulated power and its validation, the cheapest deciding design (as the statistics priced it, and again at this
run's own mean job times with this checkout's cost model), and the job times per rule, with held / kd per damage.

    .venv/bin/python tools/study_summary.py <study folder with results/stats.json and results/benchmarks/>

Reads only: results/stats.json (verified against its digest) and Snakemake's benchmark files. Nothing is computed
again but the budget at this run's job times (realign.analysis.theta_view.budget_here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from realign.analysis.provenance import job_times
from realign.analysis.theta_view import budget_here
from realign.io import read_json


def _interval(low, high) -> str:
    return f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "[unbounded]"


def verdict_lines(theta: dict) -> list[str]:
    out = [f"**Verdict: {theta['outcome']}** ({theta['reason']})", ""]
    out += [f"- {line}" for line in theta["lines"]]
    return out


def theta_table(theta: dict) -> list[str]:
    verdicts = {v["damage"]: v for v in theta["verdicts"]}
    out = ["| damage | family | θ | 95 % interval | seeds | gain held | gain kd | verdict | H1′ | H2 |",
           "|---|---|---:|---|---:|---:|---:|---|---|---|"]
    for d in theta["damages"]:
        v = verdicts[d["damage"]]
        out.append(f"| {d['damage']} | {d['family']} | {d['theta']:.3f} | {_interval(d['low'], d['high'])} | "
                   f"{len(d['seeds'])} | {d['gain_held']:.4f} | {d['gain_kd']:.4f} | {v['outcome']} | "
                   f"{v['h1prime']} | {v['h2']} |")
    s = theta.get("summary")
    if s:
        out.append(f"| fixed effect (description) | | {s['theta']:.3f} | {_interval(s['low'], s['high'])} "
                   "| | | | | | |")
    return out


def eligibility_table(theta: dict) -> list[str]:
    out = ["| damage | eligible | damage (lower bound) | kd gain [interval] | kd ΔCKA [interval] | reasons |",
           "|---|---|---|---|---|---|"]
    for e in theta["eligibility"]:
        out.append(f"| {e['damage']} | {e['eligible']} | {e['damage_value']:.4f} ({e['damage_low']:.4f}) | "
                   f"{e['kd_gain']:.4f} {_interval(e['kd_gain_low'], e['kd_gain_high'])} | "
                   f"{e['kd_delta_cka']:.4f} {_interval(e['kd_delta_cka_low'], e['kd_delta_cka_high'])} | "
                   f"{'; '.join(e['reasons']) or '-'} |")
    return out


def check_lines(theta: dict) -> list[str]:
    out = []
    for c in theta["checks"]:
        out.append(f"- **{c['damage']}**, {c['held']} against {c['kd']}: "
                   f"{'passed' if c['passed'] else 'failed'}; H2 {c['h2']}")
        out += [f"  - {p['name']} ({'required' if p['required'] else 'H2'}): {p['statement']}" for p in c["parts"]]
    for o in theta.get("only") or []:
        out.append(f"- **H1′ on {o['damage']}** ({o['arm']}, {len(o['seeds'])} seeds): delta CKA "
                   f"{o['delta_cka']:.4g} vs {o['cka_threshold']:.4g} (p {o['p_cka_rise']:.3g}); gain "
                   f"{o['gain']:.4g} vs {o['gain_threshold']:.4g} (p {o['p_short']:.3g}); Holm p {o['p_holm']:.3g}")
    return out


def power_lines(theta: dict, means: dict[str, float]) -> list[str]:
    power = theta.get("power") or {}
    if "error" in power or not power:
        return [f"No power simulation: {power.get('error', 'none in the statistics')}"]
    at = power["at_design"]
    out = [f"- At the design ({power['design']['n_seeds']} seeds): refute power {at['refute_power']}, support "
           f"power {at['support_power']}, check {at['check_power']}; false support {at['false_support']}, false "
           f"refute {at['false_refute']} ({power['n_tables']} simulated studies)."]
    out += [f"- Validation, {v['damage']}: observed half-width {v['observed_halfwidth']:.4f}, simulated median "
            f"{v['simulated_median_halfwidth']:.4f} (ratio {v['ratio']:.3f}; within tolerance: "
            f"{v['within_tolerance']})" for v in power["validation"]]
    best = power.get("budget")
    out.append("- Cheapest deciding design at the statistics' default job costs: " + (
        f"{best['n_seeds']} seeds, {best['items']}x items, {best['probes']}x probe sequences, "
        f"{best['job_seconds'] / 3600:.1f} h" if best else "none in the grid"))
    here = budget_here(power, means)
    out.append("- The same at this run's mean job times: " + (
        f"{here.n_seeds} seeds, {here.items:g}x items, {here.probes:g}x probe sequences, {here.job_hours:.1f} h "
        f"(seconds per job: {', '.join(f'{k} {v:.0f}' for k, v in here.costs.items())})" if here else
        "none in the grid"))
    return out


def time_lines(times: pd.DataFrame) -> list[str]:
    by_rule = times.groupby("rule")["seconds"].agg(["count", "median", "mean", "sum"]).sort_values("sum",
                                                                                                  ascending=False)
    out = ["| rule | jobs | median s | mean s | total h |", "|---|---:|---:|---:|---:|"]
    out += [f"| {rule} | {int(r['count'])} | {r['median']:.1f} | {r['mean']:.1f} | {r['sum'] / 3600:.2f} |"
            for rule, r in by_rule.iterrows()]
    out.append(f"| **all** | {len(times)} | | | **{times['seconds'].sum() / 3600:.2f}** |")
    recover = times[times["rule"] == "recover"].copy()
    if len(recover):
        parts = recover["job"].str.split("/")
        recover["damage"] = parts.str[-2]
        recover["arm"] = parts.str[-1].str.replace(r"\+seed\d+$", "", regex=True)
        arms = recover.groupby(["damage", "arm"])["seconds"].mean().unstack()
        if {"kd", "alignment-held"} <= set(arms.columns):
            out.append("")
            out += [f"- held / kd on {damage}: {row['alignment-held'] / row['kd']:.2f} (mean "
                    f"{row['alignment-held']:.0f} s against {row['kd']:.0f} s)" for damage, row in arms.iterrows()]
    return out


def summary(study: Path) -> str:
    stats = read_json(study / "results" / "stats.json", verify=True, producer="the `report` rule")
    theta = stats["theta"]
    times = job_times(study / "results" / "benchmarks")
    means = times.groupby("rule")["seconds"].mean().to_dict()
    out = [f"# {study}", ""]
    if not theta.get("estimated"):
        out += [f"theta not estimated: {theta.get('reason')}", ""]
    else:
        out += verdict_lines(theta) + ["", "## Eligibility", ""] + eligibility_table(theta)
        out += ["", "## θ per damage", ""] + theta_table(theta)
        out += ["", "## Manipulation checks, H1′", ""] + check_lines(theta)
        out += ["", "## Power", ""] + power_lines(theta, means)
    out += ["", "## Job times", ""] + time_lines(times)
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
