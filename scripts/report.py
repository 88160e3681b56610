from pathlib import Path

import pandas as pd

from realign.analysis.provenance import provenance as assemble_provenance
from realign.analysis.report import render_report
from realign.analysis.settings import AnalysisSettings
from realign.analysis.stats import analyze_with_controls
from realign.analysis.table import read_table
from realign.io import file_sha256, jsonable, read_json, read_parquet, write_digest, write_json
from realign.logs import route_to

route_to(snakemake.log[0])
settings = AnalysisSettings.from_config({"analysis": snakemake.params.analysis, "seed": snakemake.params.seed})
table = read_table(snakemake.input.table)
# Sealed: stats.json gets its digest sidecar, and the report renders what is read back through the verified reader,
# so the page and the file cannot disagree and an edit of the file is caught by whoever reads it next.
write_json(snakemake.output.stats, jsonable(analyze_with_controls(table, settings)), digest=True)
stats = read_json(snakemake.output.stats, verify=True, producer="the `report` rule")
# Run times of every job finished so far (all of them but this report) from Snakemake's benchmark files.
provenance = assemble_provenance(snakemake.params.config, snakemake.params.config_hash, snakemake.input.teachers[0],
                                 snakemake.input.prompts, snakemake.input.benchmarks, snakemake.params.timings_root,
                                 code=snakemake.params.code)
# The null floors of each model (its name is the folder: results/null/<model>/floors.parquet).
null_floors = pd.concat([read_parquet(path, producer="the `null_floors` rule").assign(model=Path(path).parent.name)
                         for path in snakemake.input.null_floors], ignore_index=True)
# The layer x layer CKA of each artifact, from the similarity summaries this rule declares as inputs.
matrices = {tuple(cell): read_json(path, verify=True, producer="the `similarity` rule")
            for cell, path in zip(snakemake.params.cells, snakemake.input.similarity_summaries, strict=True)}
render_report(table, stats, read_table(snakemake.input.similarity_layers), provenance, snakemake.output.report,
              null_floors=null_floors, matrices=matrices, figures_dir=snakemake.output.figures)
write_digest(snakemake.output.report, file_sha256(snakemake.output.report))  # the report sealed as well
