"""fp32 against bf16 measurement on the same artifacts (issue 29's validation of `measure.dtype`): two results
folders of one study, measured with measure.dtype float32 and bfloat16, compared on every quantity a verdict reads.

    python benchmarks/precision_check.py FP32/results BF16/results --model smollm2-135m \
        --damage magnitude-50 --recoveries kd alignment-held [--damage rtn-w3g64 --recoveries ...]

For each damage D and recovery R of it:
- the benchmark score (bench_logprob: per task the mean gold log-probability, averaged over tasks) of the teacher,
  D and R, and the per-item differences of the gold log-probabilities between the precisions;
- the paired gains on the same items, damage = teacher - D and gain = R - D, with their item standard error;
- Delta CKA = CKA(R) - CKA(D) (debiased, the alignment-range layer mean), its standard error from the paired
  bootstrap replicates over probe sequences;
- KL(teacher || artifact) of D and R, with its token standard error.
A quantity passes when |bf16 - fp32| <= 0.1 x its standard error (the rule the issue fixed before any of this ran).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

TOLERANCE = 0.1  # |bf16 - fp32| / standard error


def items(results: Path, model: str, degradation: str, recovery: str) -> pd.DataFrame:
    table = pd.read_parquet(results / "eval" / model / degradation / f"{recovery}.items.parquet")
    return table.set_index(["task", "item_id"])["gold_logprob"]


def bench(scores: pd.Series) -> float:
    return float(scores.groupby(level="task").mean().mean())


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """The bench_logprob difference a - b on the same items and its item standard error (tasks weighted equally)."""
    d = (a - b).dropna()
    by_task = d.groupby(level="task")
    se = math.sqrt(sum(float(g.var(ddof=1)) / len(g) for _, g in by_task)) / by_task.ngroups
    return float(by_task.mean().mean()), se


def similarity(results: Path, model: str, degradation: str, recovery: str) -> tuple[float, np.ndarray]:
    summary = json.loads((results / "similarity" / model / degradation / f"{recovery}.json").read_text())
    return summary["layer_means"]["debiased_cka"], np.array(summary["debiased_cka_mean_replicates"])


def divergence(results: Path, model: str, degradation: str, recovery: str) -> tuple[float, float]:
    record = json.loads((results / "divergence" / model / degradation / f"{recovery}.json").read_text())
    return record["kl_teacher_artifact"], record["kl_stderr"]


def check(fp32: Path, bf16: Path, model: str, damages: dict[str, list[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, per_item = [], []

    def row(quantity, a, b, se):
        rows.append({"quantity": quantity, "fp32": a, "bf16": b, "difference": b - a, "se": se,
                     "ratio": abs(b - a) / se if se > 0 else math.inf, "passes": abs(b - a) <= TOLERANCE * se})

    teacher = {name: items(r, model, "none", "none") for name, r in (("fp32", fp32), ("bf16", bf16))}
    for damage, recoveries in damages.items():
        parent = {name: items(r, model, damage, "none") for name, r in (("fp32", fp32), ("bf16", bf16))}
        a, se = paired(teacher["fp32"], parent["fp32"])
        row(f"damage {damage}", a, paired(teacher["bf16"], parent["bf16"])[0], se)
        cka_parent = {name: similarity(r, model, damage, "none") for name, r in (("fp32", fp32), ("bf16", bf16))}
        kl = [divergence(r, model, damage, "none") for r in (fp32, bf16)]
        row(f"KL {damage}", kl[0][0], kl[1][0], kl[0][1])
        for artifact in ["none", *recoveries]:
            scores = {name: items(r, model, damage, artifact) for name, r in (("fp32", fp32), ("bf16", bf16))}
            diff = (scores["bf16"] - scores["fp32"]).dropna()
            per_item.append({"artifact": f"{damage}/{artifact}", "items": len(diff),
                             "mean_abs_diff": float(diff.abs().mean()), "max_abs_diff": float(diff.abs().max()),
                             "item_sd": float(scores["fp32"].std()),
                             "bench_fp32": bench(scores["fp32"]), "bench_bf16": bench(scores["bf16"])})
        for recovery in recoveries:
            scores = {name: items(r, model, damage, recovery) for name, r in (("fp32", fp32), ("bf16", bf16))}
            a, se = paired(scores["fp32"], parent["fp32"])
            row(f"gain {damage}/{recovery}", a, paired(scores["bf16"], parent["bf16"])[0], se)
            cka = {name: similarity(r, model, damage, recovery) for name, r in (("fp32", fp32), ("bf16", bf16))}
            deltas = {name: cka[name][0] - cka_parent[name][0] for name in cka}
            se_cka = float(np.std(cka["fp32"][1] - cka_parent["fp32"][1], ddof=1))
            row(f"delta CKA {damage}/{recovery}", deltas["fp32"], deltas["bf16"], se_cka)
            kl = [divergence(r, model, damage, recovery) for r in (fp32, bf16)]
            row(f"KL {damage}/{recovery}", kl[0][0], kl[1][0], kl[0][1])
    return pd.DataFrame(rows), pd.DataFrame(per_item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("bf16", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--damage", action="append", required=True)
    parser.add_argument("--recoveries", nargs="+", action="append", required=True)
    args = parser.parse_args()
    if len(args.damage) != len(args.recoveries):
        parser.error("give one --recoveries list per --damage")
    quantities, per_item = check(args.fp32, args.bf16, args.model, dict(zip(args.damage, args.recoveries)))
    print(quantities.to_markdown(index=False, floatfmt=".4g"))
    print()
    print(per_item.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
