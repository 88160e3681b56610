from realign.logs import route_to
from realign.measure.stage import null_floors

route_to(snakemake.log[0], snakemake.threads)
similarity = snakemake.params.similarity
null_floors(snakemake.input.teacher, snakemake.input.random, snakemake.output[0], seed=similarity["seed"],
            knn_k=similarity["knn_k"])
