from realign.fetch import fetch_wheel
from realign.logs import route_to

route_to(snakemake.log[0])
fetch_wheel(snakemake.wildcards.requirement, snakemake.output[0])
