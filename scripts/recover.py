from realign.config import state_every
from realign.logs import route_to
from realign.recover.stage import run_recovery

route_to(snakemake.log[0], snakemake.threads)
run_recovery(snakemake.input.teacher, snakemake.input.damaged, snakemake.input.records, snakemake.output[0],
             snakemake.wildcards.recovery, snakemake.params.spec, snakemake.params.seed,
             teacher_top_k_path=getattr(snakemake.input, "teacher_top_k", None),
             checkpoint_steps=snakemake.params.checkpoint_steps,
             content_states=(getattr(snakemake.input, "teacher_states", None),
                             getattr(snakemake.input, "damaged_states", None)),
             # the resume cadence changes no result, so it is read here and not a param (a change reruns nothing)
             state_every=state_every(snakemake.config, snakemake.wildcards.recovery))
