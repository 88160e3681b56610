from realign.logs import route_to
from realign.measure.stage import null_activations

route_to(snakemake.log[0], snakemake.threads)
probe = snakemake.params.probe
null_activations(snakemake.input.teacher, snakemake.input.prompts, snakemake.output[0], probe["max_tokens"],
                 probe["positions"], probe["seed"])
