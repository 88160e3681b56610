from realign.logs import route_to
from realign.recover.stage import content_states

route_to(snakemake.log[0], snakemake.threads)
content_states(snakemake.input.model, snakemake.input.answers, snakemake.output[0], int(snakemake.wildcards.max_len),
               snakemake.params.alignment_layers, batch_size=snakemake.params.batch_size)
