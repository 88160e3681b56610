import logging

from realign.logs import route_to
from realign.recover.stage import teacher_rewrites

route_to(snakemake.log[0], snakemake.threads)
counts = teacher_rewrites(snakemake.input.teacher, snakemake.input.prompts,
                          snakemake.config["data"]["teacher_max_new_tokens"], snakemake.output[0],
                          batch_size=snakemake.config["measure"]["eval_batch_size"])
logging.info("rewrites accepted: %d of %d (the rest fall back to the reference)", counts["accepted"],
             counts["records"])
