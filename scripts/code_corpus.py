import logging

from realign.data.stage import prepare_code_corpus
from realign.logs import route_to

route_to(snakemake.log[0])
cfg = snakemake.config
# Enough characters for every forgetting run (about 4 characters per token, with a safety factor of 2).
tokens = max((d.get("steps", 0) * d.get("batch_size", cfg["training"]["batch_size"])
              * d.get("max_len", cfg["training"]["max_len"])) for d in cfg["degradations"].values())
max_chars = max(8 * tokens, 200_000)
summary = prepare_code_corpus(cfg["data"]["code_corpus"], cfg["data"]["code_heldout_fraction"], max_chars,
                              snakemake.output.train, snakemake.output.heldout)
logging.info("code corpus: %s", summary)
