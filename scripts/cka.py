from realign.logs import route_to
from realign.measure.stage import cka_vs_teacher

route_to(snakemake.log[0], snakemake.threads)
cka_vs_teacher(snakemake.input.teacher, snakemake.input.artifact, snakemake.output[0])
