from realign.logs import route_to
from realign.measure.stage import cka_vs_teacher

route_to(snakemake.log[0], snakemake.threads)
measure = snakemake.config["measure"]
cka_vs_teacher(snakemake.input.teacher, snakemake.input.artifact, snakemake.output.layers, snakemake.output.summary,
               n_boot=measure["cka_bootstrap"], seed=snakemake.config["seed"], knn_k=measure["knn_k"])
