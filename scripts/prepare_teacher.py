from realign.logs import route_to
from realign.models.stage import prepare_teacher

route_to(snakemake.log[0], snakemake.threads)
name = snakemake.wildcards.model
prepare_teacher(name, snakemake.params.spec, snakemake.output[0],
                wheel_dir=snakemake.input.get("wheel"))
