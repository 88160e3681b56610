import logging

from realign.data.stage import forgetting_chars_needed, prepare_code_corpus
from realign.logs import route_to

route_to(snakemake.log[0])
cfg = snakemake.config
max_chars = forgetting_chars_needed(cfg["degradations"], cfg["training"])
summary = prepare_code_corpus(cfg["data"]["code_corpus"], cfg["data"]["code_heldout_fraction"], max_chars,
                              snakemake.output.train, snakemake.output.heldout)
logging.info("code corpus: %s", summary)
