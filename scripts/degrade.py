from realign.degrade.stage import degrade
from realign.logs import route_to

route_to(snakemake.log[0], snakemake.threads)
damage = snakemake.params.damage
degrade(snakemake.input.teacher, snakemake.output[0], snakemake.wildcards.model, snakemake.wildcards.degradation,
        damage["spec"], damage["seed"], narrow_train=snakemake.input.get("narrow_train"),
        prompts_path=snakemake.input.get("prompts"), calibration=damage["calibration"])
