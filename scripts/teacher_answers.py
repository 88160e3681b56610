import logging

from realign.logs import route_to
from realign.recover.stage import teacher_answers

route_to(snakemake.log[0], snakemake.threads)
n = teacher_answers(snakemake.input.teacher, snakemake.input.prompts,
                    snakemake.config["data"]["teacher_max_new_tokens"], snakemake.output[0],
                    batch_size=snakemake.config["measure"]["eval_batch_size"])
logging.info("non-empty teacher answers: %d", n)
