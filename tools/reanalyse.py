"""Rebuild a finished study's analysis table from its per-artifact files with this checkout's code, and run the
pre-registered theta analysis on it (a re-analysis: no model is loaded, nothing is measured again).

    .venv/bin/python tools/reanalyse.py <study folder with config.yaml and results/> [out.json]

Reads results/models/*/*/*/artifact.json, results/eval/... (json + per-item records), results/divergence/...,
results/similarity/... exactly as the `table` rule does (realign.analysis.table); writes the table to
<out>.table.parquet and the theta analysis (realign.analysis.theta_summary.theta_entry) as JSON to <out>."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from realign.analysis.performance import load_records
from realign.analysis.settings import AnalysisSettings
from realign.analysis.table import Records, build_table, collect_row, write_table
from realign.analysis.theta_summary import theta_entry


def rebuild_table(study: Path):
    config = yaml.safe_load((study / "config.yaml").read_text())
    settings = AnalysisSettings.from_config(config)
    results = study / "results"
    cells, rows = [], []
    for record in sorted((results / "models").glob("*/*/*/artifact.json")):
        model, degradation, recovery = record.parent.relative_to(results / "models").parts
        stem = f"{model}/{degradation}/{recovery}"
        rows.append(collect_row(record, results / "eval" / f"{stem}.json", results / "divergence" / f"{stem}.json",
                                results / "similarity" / f"{stem}.parquet", results / "similarity" / f"{stem}.json",
                                settings.cka_estimator))
        cells.append((model, degradation, recovery))
    records = Records(load_records(zip(cells, [results / "eval" / f"{'/'.join(c)}.items.parquet" for c in cells]),
                                   "items"),
                      load_records(zip(cells, [results / "eval" / f"{'/'.join(c)}.sequences.parquet"
                                               for c in cells]), "sequences"),
                      n_boot=settings.n_boot, seed=settings.seed, alpha=settings.alpha)
    return build_table(rows, settings.performance, records), settings


def main() -> None:
    study = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("reanalysis.json")
    table, settings = rebuild_table(study)
    write_table(table, out.with_suffix(".table.parquet"))
    entry = theta_entry(table, settings)
    out.write_text(json.dumps(entry, indent=1, default=str))
    print(json.dumps({k: entry.get(k) for k in ("outcome", "reason", "lines")}, indent=1, default=str))


if __name__ == "__main__":
    main()
