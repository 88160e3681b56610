"""Job times of two results folders side by side, from Snakemake's own benchmark files (results/benchmarks/<rule>/
.../*.tsv: wall-clock seconds, max RSS): the before/after table of docs/2026-12-07-cost.md.

    python benchmarks/job_times.py BEFORE/results AFTER/results [--rules evaluate activations similarity ...]

Only jobs present in both folders are compared, unless `--all`. A job is named <rule>/<wildcards path>; the times
are what the runs measured, so run both under the same conditions (an idle machine, one job at a time) and say
which host and load they had.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from realign.analysis.provenance import job_times


def compare(before: Path, after: Path, rules: list[str] | None, everything: bool) -> pd.DataFrame:
    a, b = job_times(before / "benchmarks"), job_times(after / "benchmarks")
    merged = a.merge(b, on=["rule", "job"], how="outer" if everything else "inner", suffixes=("_before", "_after"))
    if rules:
        merged = merged[merged["rule"].isin(rules)]
    merged["ratio"] = merged["seconds_after"] / merged["seconds_before"]
    return merged.sort_values(["rule", "job"]).reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rules", nargs="*")
    parser.add_argument("--all", action="store_true", help="also jobs that ran in one folder only")
    args = parser.parse_args()
    table = compare(args.before, args.after, args.rules, args.all)
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
