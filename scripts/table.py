from realign.analysis.table import build_table, collect_row, load_cka_layers, write_table
from realign.logs import route_to

route_to(snakemake.log[0])
estimator = snakemake.params.cka_estimator
rows = [collect_row(f"{model_dir}/artifact.json", eval_json, divergence_json, cka, summary, estimator)
        for model_dir, eval_json, divergence_json, cka, summary in zip(
            snakemake.params.artifact_paths, snakemake.input.evals, snakemake.input.divergences,
            snakemake.input.ckas, snakemake.input.cka_summaries)]
write_table(build_table(rows, snakemake.params.performance), snakemake.output.table)
cells = [tuple(cell) for cell in snakemake.params.cells]
write_table(load_cka_layers(list(zip(cells, snakemake.input.ckas))), snakemake.output.cka_layers)
