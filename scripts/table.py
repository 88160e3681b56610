from realign.analysis.performance import load_records
from realign.analysis.table import Records, build_table, collect_row, load_similarity_layers, write_table
from realign.logs import route_to

route_to(snakemake.log[0])
analysis = snakemake.params.analysis
rows = [collect_row(f"{model_dir}/artifact.json", eval_json, divergence_json, layers, summary, analysis["cka_estimator"])
        for model_dir, eval_json, divergence_json, layers, summary in zip(
            snakemake.params.artifact_paths, snakemake.input.evals, snakemake.input.divergences,
            snakemake.input.similarities, snakemake.input.similarity_summaries)]
cells = [tuple(cell) for cell in snakemake.params.cells]
# Every interval of the table is a paired bootstrap over these records: the items all artifacts were scored on.
records = Records(load_records(zip(cells, snakemake.input.item_records), "items"),
                  load_records(zip(cells, snakemake.input.sequence_records), "sequences"),
                  n_boot=analysis["n_boot"], seed=snakemake.params.seed, alpha=analysis["alpha"])
write_table(build_table(rows, analysis["performance"], records), snakemake.output.table)
write_table(load_similarity_layers(list(zip(cells, snakemake.input.similarities))),
            snakemake.output.similarity_layers)
