import logging

from realign.logs import route_to
from realign.recover.stage import teacher_answers

route_to(snakemake.log[0], snakemake.threads)
generation = snakemake.params.generation
n = teacher_answers(snakemake.input.teacher, snakemake.input.prompts,
                    generation["max_new_tokens"], snakemake.output[0],
                    batch_size=generation["batch_size"])
logging.info("non-empty teacher answers: %d", n)
