from realign.logs import route_to
from realign.recover.stage import run_recovery

route_to(snakemake.log[0], snakemake.threads)
run_recovery(snakemake.input.teacher, snakemake.input.damaged, snakemake.input.answers, snakemake.output[0],
             snakemake.wildcards.recovery, snakemake.params.spec, snakemake.config["seed"])
