from realign.logs import route_to
from realign.measure.stage import activations

route_to(snakemake.log[0], snakemake.threads)
probe = snakemake.params.probe
activations(snakemake.params.artifact, snakemake.input.prompts, snakemake.output[0], probe["max_tokens"],
            probe["positions"], probe["seed"],
            snakemake.params.dtype)
