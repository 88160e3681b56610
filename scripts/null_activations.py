from realign.logs import route_to
from realign.measure.stage import null_activations

route_to(snakemake.log[0], snakemake.threads)
measure = snakemake.config["measure"]
null_activations(snakemake.input.teacher, snakemake.input.prompts, snakemake.output[0], measure["probe_max_tokens"],
                 measure["positions_per_sequence"], snakemake.config["seed"])
