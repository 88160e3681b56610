from realign.io import write_json
from realign.logs import route_to
from realign.measure.stage import divergence

route_to(snakemake.log[0], snakemake.threads)
result = divergence(snakemake.input.teacher_outputs, snakemake.params.artifact, snakemake.input.prompts,
                    snakemake.params.scoring["max_len"], snakemake.params.scoring["batch_size"],
                    snakemake.params.scoring["dtype"])
write_json(snakemake.output[0], result, digest=True)
