from realign.data.stage import NARROW_CORPORA
from realign.io import write_json
from realign.logs import route_to
from realign.measure.stage import evaluate

route_to(snakemake.log[0], snakemake.threads)
evaluation = snakemake.params.evaluation
narrow_heldout = {corpus: snakemake.input[f"{corpus}_heldout"] for corpus in NARROW_CORPORA}
result = evaluate(snakemake.params.artifact, snakemake.input.prompts, narrow_heldout, snakemake.input.tasks,
                  evaluation["tasks"], evaluation["max_len"], evaluation["code_heldout_chunks"],
                  evaluation["batch_size"])
write_json(snakemake.output[0], result, digest=True)
