import logging

from realign.logs import route_to
from realign.measure.stage import teacher_outputs

route_to(snakemake.log[0], snakemake.threads)
stats = teacher_outputs(snakemake.input.teacher, snakemake.input.prompts, snakemake.output[0],
                        snakemake.params.scoring["max_len"], snakemake.params.scoring["batch_size"],
                        snakemake.params.scoring["dtype"])
logging.info("teacher outputs cached: %s", stats)
