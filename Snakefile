# realign: does self-distillation recover a damaged LLM, and does it do so by re-aligning hidden-layer geometry?
# Entry point: validates the config, includes one rule file per stage, and asks for the report.
from snakemake.utils import min_version

min_version("9.0")


# The default study, unless --configfile names another: a second config is a whole study, not a patch on this
# one (Snakemake would otherwise merge them, and configs/full.yaml would inherit this file's models and study).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/degrade.smk"
include: "workflow/rules/recover.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/analyze.smk"


rule all:
    input:
        "results/report.html",
    default_target: True
