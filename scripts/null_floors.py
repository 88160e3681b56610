from realign.logs import route_to
from realign.measure.stage import null_floors

route_to(snakemake.log[0], snakemake.threads)
null_floors(snakemake.input.teacher, snakemake.input.random, snakemake.output[0], seed=snakemake.config["seed"],
            knn_k=snakemake.config["measure"]["knn_k"])
