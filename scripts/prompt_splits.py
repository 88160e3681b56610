import logging

from realign.data.stage import prepare_prompts
from realign.logs import route_to

route_to(snakemake.log[0])
data = snakemake.config["data"]
counts = prepare_prompts(snakemake.input.wheel, data["prompt_splits"], snakemake.config["seed"], snakemake.output[0])
logging.info("prompt splits: %s", counts)
