from realign.logs import route_to
from realign.recover.stage import teacher_top_k

route_to(snakemake.log[0], snakemake.threads)
wildcards = snakemake.wildcards
teacher_top_k(snakemake.input.teacher, snakemake.input.answers, snakemake.output[0], int(wildcards.max_len),
              int(wildcards.top_k), float(wildcards.temperature),
              batch_size=snakemake.params.batch_size)
