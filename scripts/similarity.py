from realign.logs import route_to
from realign.measure.stage import similarity_to_teacher

route_to(snakemake.log[0], snakemake.threads)
similarity = snakemake.params.similarity
similarity_to_teacher(snakemake.input.teacher, snakemake.input.artifact, snakemake.output.layers,
                      snakemake.output.summary, n_boot=similarity["n_boot"],
                      jackknife_groups=similarity["jackknife_groups"], seed=similarity["seed"],
                      knn_k=similarity["knn_k"], alignment_layers=similarity["alignment_layers"])
