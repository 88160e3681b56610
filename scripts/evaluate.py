from realign.data.stage import NARROW_CORPORA
from realign.io import write_json, write_parquet
from realign.logs import route_to
from realign.measure.stage import evaluate

route_to(snakemake.log[0], snakemake.threads)
evaluation = snakemake.params.evaluation
narrow_heldout = {corpus: snakemake.input[f"{corpus}_heldout"] for corpus in NARROW_CORPORA}
summary, items, sequences = evaluate(snakemake.params.artifact, snakemake.input.prompts, narrow_heldout, snakemake.input.tasks,
                  evaluation["tasks"], evaluation["max_len"], evaluation["code_heldout_chunks"],
                  evaluation["batch_size"], evaluation["dtype"])
write_parquet(items, snakemake.output.item_records)
write_parquet(sequences, snakemake.output.sequence_records)
write_json(snakemake.output.summary, summary, digest=True)  # last: the summary's presence means all three exist
