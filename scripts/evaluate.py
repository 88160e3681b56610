from realign.data.stage import NARROW_CORPORA
from realign.io import write_json
from realign.logs import route_to
from realign.measure.stage import evaluate

route_to(snakemake.log[0], snakemake.threads)
cfg = snakemake.config
narrow_heldout = {corpus: snakemake.input[f"{corpus}_heldout"] for corpus in NARROW_CORPORA}
result = evaluate(snakemake.params.artifact, snakemake.input.prompts, narrow_heldout, snakemake.input.tasks,
                  list(cfg["measure"]["benchmarks"]), cfg["training"]["max_len"], cfg["data"]["code_heldout_chunks"],
                  cfg["measure"]["eval_batch_size"])
write_json(snakemake.output[0], result)
