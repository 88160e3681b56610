"""Where did a finished study's time and memory go? Per-rule table from Snakemake's `benchmark:` files.

Every rule writes results/benchmarks/<rule>/<wildcards...>.tsv (columns s, h:m:s, max_rss, ...; max_rss in MiB,
"NA" or "-" when Snakemake could not sample the process). One file is one job; a file with several rows (a
`repeat()` benchmark) counts as one job with its mean time and its largest RSS.

    python benchmarks/study_rules.py [STUDY_DIR]      # default: the current directory
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "NA" / "-": not measured


def read_job(tsv: Path) -> tuple[float, float | None]:
    """(seconds, peak RSS in MiB or None) of one job's benchmark file."""
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{tsv} is not a Snakemake benchmark file (no rows, or no 's' column)")
    seconds = [_number(r["s"]) for r in rows]
    if any(s is None for s in seconds):
        raise ValueError(f"{tsv}: column 's' holds a non-number: {[r['s'] for r in rows]}")
    rss = [v for v in (_number(r.get("max_rss")) for r in rows) if v is not None]
    return sum(seconds) / len(seconds), max(rss) if rss else None


def summarise(study_dir: str | Path) -> list[dict]:
    """One row per rule (jobs, total_s, max_s, peak_rss_mib), the slowest rule first."""
    root = Path(study_dir) / "results" / "benchmarks"
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise FileNotFoundError(f"no Snakemake benchmark files (*.tsv) under {root}: is {study_dir} a finished study?")
    rules: dict[str, dict] = {}
    for tsv in files:
        rule = tsv.relative_to(root).parts[0].removesuffix(".tsv")
        seconds, rss = read_job(tsv)
        entry = rules.setdefault(rule, {"rule": rule, "jobs": 0, "total_s": 0.0, "max_s": 0.0, "peak_rss_mib": None})
        entry["jobs"] += 1
        entry["total_s"] += seconds
        entry["max_s"] = max(entry["max_s"], seconds)
        if rss is not None:
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"] or 0.0, rss)
    return sorted(rules.values(), key=lambda r: (-r["total_s"], r["rule"]))


def format_table(rows: list[dict]) -> str:
    rss = [r["peak_rss_mib"] for r in rows if r["peak_rss_mib"] is not None]
    total = {"rule": "total", "jobs": sum(r["jobs"] for r in rows), "total_s": sum(r["total_s"] for r in rows),
             "max_s": max(r["max_s"] for r in rows), "peak_rss_mib": max(rss) if rss else None}
    width = max(len(r["rule"]) for r in [*rows, total])
    lines = [f"{'rule':<{width}}  {'jobs':>5}  {'total s':>10}  {'max s':>9}  {'peak RSS MiB':>12}"]
    for r in [*rows, total]:
        if r is total:
            lines.append("-" * len(lines[0]))
        peak = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"{r['rule']:<{width}}  {r['jobs']:>5}  {r['total_s']:>10.1f}  {r['max_s']:>9.1f}  {peak:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", nargs="?", default=".")
    args = parser.parse_args(argv)
    try:
        rows = summarise(args.study_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"study_rules: {err}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
