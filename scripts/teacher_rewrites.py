import logging

from realign.logs import route_to
from realign.recover.stage import teacher_rewrites

route_to(snakemake.log[0], snakemake.threads)
generation = snakemake.params.generation
counts = teacher_rewrites(snakemake.input.teacher, snakemake.input.prompts,
                          generation["max_new_tokens"], snakemake.output[0],
                          batch_size=generation["batch_size"])
logging.info("rewrites accepted: %d of %d (the rest fall back to the reference)", counts["accepted"],
             counts["records"])
