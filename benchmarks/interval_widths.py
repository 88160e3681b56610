"""How much narrower is a recovery fraction's interval when artifacts are paired on items and scored continuously?

For every recovered artifact of a finished study, the 95% bootstrap interval of its recovery fraction
gain / damage = (P(artifact) - P(parent)) / (P(teacher) - P(parent)), computed from the per-item records that the
`evaluate` rule wrote, four ways:

* (a) unpaired accuracy: each artifact's items resampled on their own (what stderr-based differences assume),
  on `bench_mean` (lm-eval's acc, the old primary measure);
* (b) paired accuracy: one resampling of items shared by all artifacts, on `bench_mean`;
* (c) paired continuous: the same, on `bench_logprob` (the gold choice's normalised log-probability);
* (d) unpaired continuous, for completeness.

    python benchmarks/interval_widths.py [STUDY_DIR] [--n-boot 2000] [--seed 0] [--json OUT]

Prints one row per recovered artifact: the point recovery fraction and the half-width of each interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from realign.analysis.performance import bootstrap, interval, load_records, measure, paired_matrices, statistic
from realign.analysis.table import read_table

WAYS = (("a_unpaired_acc", "bench_mean", False), ("b_paired_acc", "bench_mean", True),
        ("c_paired_logprob", "bench_logprob", True), ("d_unpaired_logprob", "bench_logprob", False))


def widths(study_dir: str | Path, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    study_dir = Path(study_dir)
    table = read_table(study_dir / "results" / "table.parquet")
    keys = [tuple(k) for k in table[["model", "degradation", "recovery"]].itertuples(index=False, name=None)]
    paths = [(k, study_dir / "results" / "eval" / k[0] / k[1] / f"{k[2]}.items.parquet") for k in keys]
    items = load_records(paths, "items")
    position = {k: i for i, k in enumerate(keys)}
    estimates = {}
    for way, name, joint in WAYS:
        m = measure(name)
        paired = paired_matrices(items, m, keys)
        estimates[way] = (statistic(paired, m), bootstrap(paired, m, n_boot, seed, joint=joint))
    out = []
    for k in keys:
        m, d, r = k
        if d == "none" or r == "none":
            continue
        i, t, p = position[k], position[(m, "none", "none")], position[(m, d, "none")]
        row = {"artifact": "/".join(k)}
        for way, (point, boot) in estimates.items():
            fraction = (point[i] - point[p]) / (point[t] - point[p])
            replicates = (boot[:, i] - boot[:, p]) / (boot[:, t] - boot[:, p])
            low, high = interval(replicates)
            row[way] = {"recovery_fraction": float(fraction), "ci_low": low, "ci_high": high,
                        "half_width": (high - low) / 2}
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", nargs="?", default=".")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = widths(args.study_dir, args.n_boot, args.seed)
    header = f"{'artifact':42s}" + "".join(f"{way:>26s}" for way, _, _ in WAYS)
    print(header)
    for row in rows:
        cells = "".join(f"{row[w]['recovery_fraction']:>14.3f} ±{row[w]['half_width']:<9.3f}" for w, _, _ in WAYS)
        print(f"{row['artifact']:42s}{cells}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("median half-widths: " + ", ".join(
        f"{w} {np.median([r[w]['half_width'] for r in rows]):.3f}" for w, _, _ in WAYS))


if __name__ == "__main__":
    main()
